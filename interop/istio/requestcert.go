package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"istio.io/istio/pkg/security"
	"istio.io/istio/pkg/spiffe"
	"istio.io/istio/security/pkg/credentialfetcher"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

type requestCertOpts struct {
	Address     string
	CAFile      string
	ServerName  string
	TokenFile   string
	TrustDomain string
	ClusterID   string
	TTL         time.Duration
	KeyType     string
	ExpectID    string
	CSRHost     string
	OutDir      string
	Timeout     time.Duration
}

const citadelPkg = "istio nodeagent/caclient/providers/citadel"

// requestCert does what istio-agent does for its workload certificate
// (security/pkg/nodeagent/cache.SecretManagerClient.generateNewSecret) with
// Istio's own code: the token comes from credentialfetcher.NewCredFetcher(JWT,
// ...) (the agent's file-token plugin), the CSR and key from pki/util.GenCSR
// with the agent's CertOptions, and the call goes through Istio's own CA client
// citadel.NewCitadelClient / CitadelClient.CSRSign (gRPC TLS verified against
// CAFile with ServerName as the TLS server name, "authorization: Bearer <token>"
// and "ClusterID" metadata, CertSigner metadata, Istio's CA retry interceptor).
// The response is then checked by checkResponse.
func requestCert(o requestCertOpts) (*responseResult, []byte, error) {
	subject := o.Address
	// Istio's token plugin silently sends no token when the file is unreadable;
	// say so instead of letting the CA answer "Unauthenticated".
	tok, err := os.ReadFile(o.TokenFile)
	if err != nil {
		return nil, nil, rejectf("istio credentialfetcher/plugin.KubernetesTokenPlugin", o.TokenFile, "token file unreadable (istio-agent would send no token): %v", err)
	}
	if strings.TrimSpace(string(tok)) == "" {
		return nil, nil, rejectf("istio credentialfetcher/plugin.KubernetesTokenPlugin", o.TokenFile, "token file is empty (istio-agent would send no token)")
	}
	trust, err := os.ReadFile(o.CAFile)
	if err != nil {
		return nil, nil, rejectf(citadelPkg+".NewCitadelClient", o.CAFile, "cannot read --ca-file: %v", err)
	}

	credFetcher, err := credentialfetcher.NewCredFetcher(security.JWT, o.TrustDomain, o.TokenFile, "")
	if err != nil {
		return nil, nil, reject("istio credentialfetcher.NewCredFetcher", o.TokenFile, err)
	}
	opts := &security.Options{
		CAEndpoint:         o.Address,
		CAEndpointSAN:      o.ServerName,
		CAProviderName:     "Citadel",
		TrustDomain:        o.TrustDomain,
		ClusterID:          o.ClusterID,
		CredFetcher:        credFetcher,
		WorkloadRSAKeySize: 2048,
		SecretTTL:          o.TTL,
	}
	if o.KeyType == "ec" {
		opts.ECCSigAlg = string(util.EcdsaSigAlg)
		opts.ECCCurve = string(util.P256Curve)
	}

	// Same CertOptions as generateNewSecret (Pkcs8Keys defaults to false).
	certOpts := util.CertOptions{
		Host:       o.CSRHost,
		RSAKeySize: opts.WorkloadRSAKeySize,
		PKCS8Key:   false,
		ECSigAlg:   util.SupportedECSignatureAlgorithms(opts.ECCSigAlg),
		ECCCurve:   util.SupportedEllipticCurves(opts.ECCCurve),
	}
	csrPEM, keyPEM, err := util.GenCSR(certOpts)
	if err != nil {
		return nil, nil, reject("istio pki/util.GenCSR", o.CSRHost, err)
	}

	client, err := citadel.NewCitadelClient(opts, &citadel.TLSOptions{RootCert: o.CAFile})
	if err != nil {
		return nil, nil, reject(citadelPkg+".NewCitadelClient", subject, err)
	}
	defer client.Close()

	// CSRSign has no deadline of its own; bound it.
	type signResult struct {
		chain []string
		err   error
	}
	done := make(chan signResult, 1)
	go func() {
		chain, err := client.CSRSign(csrPEM, int64(o.TTL.Seconds()))
		done <- signResult{chain, err}
	}()
	var chain []string
	select {
	case r := <-done:
		if r.err != nil {
			return nil, nil, reject(citadelPkg+".CitadelClient.CSRSign", subject+" (server name "+o.ServerName+")", r.err)
		}
		chain = r.chain
	case <-time.After(o.Timeout):
		return nil, nil, rejectf(citadelPkg+".CitadelClient.CSRSign", subject, "no answer within %v", o.Timeout)
	}

	res, err := checkResponse(chain, keyPEM, trust, o.TrustDomain, o.ExpectID, "the response of "+subject)
	if err != nil {
		return nil, nil, err
	}
	return res, keyPEM, nil
}

func writeOutputs(dir string, res *responseResult, keyPEM []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	leaf := util.PemCertBytestoString(res.CertChainPEM)[0] + "\n"
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"leaf.pem", []byte(leaf), 0o644},
		{"key.pem", keyPEM, 0o600},
		{"chain.pem", res.CertChainPEM, 0o644},
		{"root.pem", res.RootPEM, 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

func cmdRequestCert(args []string) error {
	fs := newFlagSet("request-cert")
	var o requestCertOpts
	fs.StringVar(&o.Address, "address", "", "workload CA HOST:PORT (required)")
	fs.StringVar(&o.CAFile, "ca-file", "", "PEM trust bundle that verifies the CA's TLS cert and the issued chain (required)")
	fs.StringVar(&o.ServerName, "server-name", "", "TLS server name to verify, istio-agent's CA_ADDR SAN, e.g. istiod.istio-system.svc (required)")
	fs.StringVar(&o.TokenFile, "token-file", "", "file holding the JWT sent as 'authorization: Bearer' (required)")
	fs.StringVar(&o.TrustDomain, "trust-domain", "", "trust domain of the workload (required)")
	fs.StringVar(&o.ClusterID, "cluster-id", "", "value of the ClusterID metadata, like ISTIO_META_CLUSTER_ID (default empty, sent empty as istio-agent does)")
	fs.DurationVar(&o.TTL, "ttl", time.Hour, "requested validity_duration")
	fs.StringVar(&o.KeyType, "key-type", "rsa", "workload key: rsa (RSA 2048, istio-agent's default) or ec (ECDSA P-256, ECC_SIGNATURE_ALGORITHM=ECDSA)")
	fs.StringVar(&o.ExpectID, "expect-id", "", "required SPIFFE identity of the leaf, e.g. spiffe://cluster.local/ns/default/sa/sleep")
	fs.StringVar(&o.CSRHost, "csr-host", "", "SAN put in the CSR (default: --expect-id, else spiffe://TD/ns/default/sa/default); the CA must ignore it")
	fs.StringVar(&o.OutDir, "out-dir", "", "write leaf.pem, key.pem, chain.pem and root.pem (the last element) here")
	fs.DurationVar(&o.Timeout, "timeout", 30*time.Second, "give up on the CA after this long")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usagef("unexpected arguments %v", fs.Args())
	}
	if err := o.validate(); err != nil {
		return err
	}
	res, keyPEM, err := requestCert(o)
	if err != nil {
		return err
	}
	if o.OutDir != "" {
		if err := writeOutputs(o.OutDir, res, keyPEM); err != nil {
			return fmt.Errorf("writing --out-dir: %v", err)
		}
	}
	fmt.Println(res.summary("request-cert "+o.Address, o.KeyType))
	return nil
}

func (o *requestCertOpts) validate() error {
	var missing []string
	for _, f := range []struct{ name, v string }{
		{"--address", o.Address}, {"--ca-file", o.CAFile}, {"--server-name", o.ServerName},
		{"--token-file", o.TokenFile}, {"--trust-domain", o.TrustDomain},
	} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return usagef("missing %s", strings.Join(missing, ", "))
	}
	if o.KeyType != "ec" && o.KeyType != "rsa" {
		return usagef("--key-type must be ec or rsa, got %q", o.KeyType)
	}
	if o.TTL <= 0 {
		return usagef("--ttl must be positive")
	}
	if o.ExpectID != "" {
		if _, err := spiffe.ParseIdentity(o.ExpectID); err != nil {
			return usagef("--expect-id %q: istio pkg/spiffe.ParseIdentity: %v", o.ExpectID, err)
		}
	}
	if o.CSRHost == "" {
		o.CSRHost = o.ExpectID
	}
	if o.CSRHost == "" {
		o.CSRHost = spiffe.Identity{TrustDomain: o.TrustDomain, Namespace: "default", ServiceAccount: "default"}.String()
	}
	return nil
}

func (r *responseResult) summary(prefix, keyType string) string {
	return fmt.Sprintf("OK %s: id=%s serial=%s notAfter=%s key=%s cert_chain=%d elements (leaf + %d intermediate(s) + root bundle of %d)",
		prefix, r.ID, serialHex(r.Leaf), r.Expiry.UTC().Format(time.RFC3339), keyType, r.Elements, r.Intermediates, r.Roots)
}
