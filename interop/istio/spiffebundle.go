package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"istio.io/istio/pkg/spiffe"
)

const spiffeBundleCheck = "istio pkg/spiffe.RetrieveSpiffeBundleRootCerts (MeshConfig.caCertificates[].spiffeBundleUrl)"

// bundleDoc mirrors the unexported pkg/spiffe.bundleDoc Istio decodes a bundle
// into (go-jose v4's JWK Set plus the two SPIFFE members). Istio's function
// returns only the roots; this reads the sequence number the same way.
type bundleDoc struct {
	jose.JSONWebKeySet
	Sequence    uint64 `json:"spiffe_sequence"`
	RefreshHint int    `json:"spiffe_refresh_hint"`
}

// cmdSpiffeBundle fetches a trust domain's SPIFFE bundle with Istio's own code
// (https_web: the endpoint's certificate checked against --ca-file for the URL's
// host) and prints, on stdout, "sequence N" and "refresh-hint N" then the roots
// Istio loaded as PEM.
func cmdSpiffeBundle(args []string) error {
	fs := newFlagSet("spiffe-bundle")
	td := fs.String("trust-domain", "", "the trust domain the endpoint serves")
	endpoint := fs.String("url", "", "the bundle endpoint, https://host:port/")
	caFile := fs.String("ca-file", "", "PEM roots the endpoint's serving certificate must chain to")
	timeout := fs.Duration("timeout", 10*time.Second, "how long Istio retries the fetch")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *td == "" || *endpoint == "" || *caFile == "" {
		return usagef("--trust-domain, --url and --ca-file are required")
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		return usagef("reading --ca-file: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return usagef("--ca-file %s holds no PEM certificate", *caFile)
	}
	roots, err := spiffe.RetrieveSpiffeBundleRootCerts(map[string]string{*td: *endpoint}, pool, *timeout)
	if err != nil {
		return reject(spiffeBundleCheck, *endpoint, err)
	}
	doc, err := fetchBundleDoc(*endpoint, pool)
	if err != nil {
		return reject("go-jose v4 JSONWebKeySet (Istio's bundleDoc)", *endpoint, err)
	}
	fmt.Printf("sequence %d\nrefresh-hint %d\n", doc.Sequence, doc.RefreshHint)
	for _, c := range roots[*td] {
		if err := pem.Encode(os.Stdout, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
			return err
		}
	}
	return nil
}

// fetchBundleDoc reads the document into Istio's bundleDoc shape.
func fetchBundleDoc(endpoint string, pool *x509.CertPool) (*bundleDoc, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, err
	}
	// As Istio's own fetch: the URL's host as server name, the given roots.
	tlsConfig := &tls.Config{ServerName: u.Hostname(), RootCAs: pool, MinVersion: tls.VersionTLS12}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	resp, err := client.Get(endpoint)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	doc := new(bundleDoc)
	if err := json.NewDecoder(resp.Body).Decode(doc); err != nil {
		return nil, err
	}
	return doc, nil
}
