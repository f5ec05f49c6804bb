package main

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strings"
	"time"

	"istio.io/istio/pkg/spiffe"
	nodeagentutil "istio.io/istio/security/pkg/nodeagent/util"
	"istio.io/istio/security/pkg/pki/util"
)

// responseResult is what the checks learned from an IstioCertificateResponse.
type responseResult struct {
	Leaf          *x509.Certificate
	ID            string
	Expiry        time.Time
	Elements      int
	Intermediates int
	Roots         int
	CertChainPEM  []byte // concatCerts(cert_chain), what istio-agent stores as the cert chain
	RootPEM       []byte // the last element, what istio-agent takes as its root
}

// concatCerts mirrors security/pkg/nodeagent/cache.concatCerts (unexported):
// how istio-agent joins cert_chain into one PEM blob.
func concatCerts(certsPEM []string) []byte {
	var b bytes.Buffer
	for i, c := range certsPEM {
		b.WriteString(c)
		if i < len(certsPEM)-1 && !strings.HasSuffix(c, "\n") {
			b.WriteString("\n")
		}
	}
	return b.Bytes()
}

// pemCerts parses every PEM block of s, requiring each to be a CERTIFICATE.
func pemCerts(s string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := []byte(s)
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block of type %q, want CERTIFICATE", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%d bytes of non-PEM data", len(bytes.TrimSpace(rest)))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no PEM certificate")
	}
	return out, nil
}

func isSelfSignedCA(c *x509.Certificate) bool {
	return c.IsCA && bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

func name(c *x509.Certificate) string {
	if s := c.Subject.String(); s != "" {
		return fmt.Sprintf("%q", s)
	}
	if len(c.URIs) > 0 {
		return c.URIs[0].String()
	}
	return "serial " + serialHex(c)
}

// checkResponse checks an IstioCertificateResponse.cert_chain the way the
// workload side uses it:
//   - istio-agent (security/pkg/nodeagent/cache.SecretManagerClient.generateNewSecret)
//     joins it with concatCerts, reads the expiry with
//     nodeagent/util.ParseCertAndGetExpiryTimestamp and takes the LAST element as
//     its root cert; CitadelClient.CSRSign already refused len(cert_chain) <= 1;
//   - the API contract: one cert per element, leaf first, root last (istiod's
//     own last element is the whole root-cert.pem, so it may hold several roots);
//   - every root of the last element is in the caller's trust bundle;
//   - each element is signed by the next (leaf → intermediates → root);
//   - crypto/x509 verification against the trust bundle, once for
//     ExtKeyUsageClientAuth and once for ExtKeyUsageServerAuth (Go accepts a
//     chain when ANY listed usage is allowed, hence two calls);
//   - Istio's pki/util.VerifyCertificate (chain + private key matches the leaf);
//   - Istio's SPIFFE peer verification, pkg/spiffe.PeerCertVerifier (exactly one
//     URI SAN, trust domain mapped to the trust bundle, chain verifies), the SAN
//     read with pki/util.ExtractIDs and parsed with pkg/spiffe.ParseIdentity /
//     GetTrustDomainFromURISAN, equal to expectID when given.
func checkResponse(chain []string, keyPEM, trustBundlePEM []byte, trustDomain, expectID, what string) (*responseResult, error) {
	const agent = "cert_chain contract check (ca.proto)"
	if len(chain) <= 1 {
		return nil, rejectf("istio nodeagent/caclient/providers/citadel.CitadelClient.CSRSign", what, "invalid empty CertChain (%d elements; want leaf ... root)", len(chain))
	}
	res := &responseResult{Elements: len(chain)}
	last := len(chain) - 1

	// istio-agent's own handling.
	res.CertChainPEM = concatCerts(chain)
	expiry, err := nodeagentutil.ParseCertAndGetExpiryTimestamp(res.CertChainPEM)
	if err != nil {
		return nil, reject("istio nodeagent/util.ParseCertAndGetExpiryTimestamp", what, err)
	}
	res.Expiry = expiry
	res.RootPEM = []byte(chain[last])

	// Shape: one certificate per element except the last (root bundle).
	var path []*x509.Certificate // elements 0..last-1
	for i := 0; i < last; i++ {
		certs, err := pemCerts(chain[i])
		if err != nil {
			return nil, rejectf(agent+" [one cert per element]", what, "element %d is not one PEM certificate: %v", i, err)
		}
		if len(certs) != 1 {
			return nil, rejectf(agent+" [one cert per element]", what, "element %d holds %d certificates, want exactly one per element (only the last element, the root bundle, may hold several)", i, len(certs))
		}
		path = append(path, certs[0])
	}
	roots, err := pemCerts(chain[last])
	if err != nil {
		return nil, rejectf(agent+" [root last]", what, "last element (root) is not PEM certificates: %v", err)
	}
	res.Roots = len(roots)
	leaf := path[0]
	res.Leaf = leaf
	if leaf.IsCA {
		return nil, rejectf(agent+" [leaf first]", what, "element 0 (%s) is a CA certificate, want the workload leaf first", name(leaf))
	}
	for _, r := range roots {
		if !isSelfSignedCA(r) {
			return nil, rejectf(agent+" [root last]", what, "last element holds %s, which is not a self-signed CA root", name(r))
		}
	}

	// Trust bundle.
	trusted, err := pemCerts(string(trustBundlePEM))
	if err != nil {
		return nil, rejectf(agent+" [trust bundle]", what, "trust bundle unreadable: %v", err)
	}
	trustedPool := x509.NewCertPool()
	trustedDER := map[string]bool{}
	for _, t := range trusted {
		trustedPool.AddCert(t)
		trustedDER[string(t.Raw)] = true
	}
	for _, r := range roots {
		if !trustedDER[string(r.Raw)] {
			return nil, rejectf(agent+" [root in trust bundle]", what, "root %s of the last element is not in the trust bundle (%d roots)", name(r), len(trusted))
		}
	}

	// Order: each element is issued by the next; a self-signed root may close
	// the path (istiod's cert-chain.pem includes the root) only at its end.
	for i, c := range path {
		if i > 0 && isSelfSignedCA(c) {
			if i != len(path)-1 {
				return nil, rejectf(agent+" [order: each element signed by the next]", what, "element %d (%s) is a self-signed root but is followed by element %d, want root last", i, name(c), i+1)
			}
			if !trustedDER[string(c.Raw)] {
				return nil, rejectf(agent+" [root in trust bundle]", what, "element %d (%s) is a root not in the trust bundle", i, name(c))
			}
			break
		}
		if i+1 < len(path) {
			if err := c.CheckSignatureFrom(path[i+1]); err != nil {
				return nil, rejectf(agent+" [order: each element signed by the next]", what, "element %d (%s) is not signed by element %d (%s): %v", i, name(c), i+1, name(path[i+1]), err)
			}
			continue
		}
		signed := false
		for _, r := range roots {
			if c.CheckSignatureFrom(r) == nil {
				signed = true
				break
			}
		}
		if !signed {
			return nil, rejectf(agent+" [order: each element signed by the next]", what, "element %d (%s) is not signed by any root in the last element", i, name(c))
		}
	}
	inter := x509.NewCertPool()
	for _, c := range path[1:] {
		inter.AddCert(c)
		if !isSelfSignedCA(c) {
			res.Intermediates++
		}
	}

	// crypto/x509 chain verification for both TLS roles.
	for _, eku := range []struct {
		name  string
		usage x509.ExtKeyUsage
	}{{"ExtKeyUsageClientAuth", x509.ExtKeyUsageClientAuth}, {"ExtKeyUsageServerAuth", x509.ExtKeyUsageServerAuth}} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: trustedPool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{eku.usage}}); err != nil {
			return nil, rejectf("crypto/x509.Certificate.Verify(KeyUsages="+eku.name+")", what, "%v", err)
		}
	}

	// Istio's certificate verifier: chain to the trust bundle + key matches leaf.
	if err := util.VerifyCertificate(keyPEM, res.CertChainPEM, trustBundlePEM, nil); err != nil {
		return nil, reject("istio pki/util.VerifyCertificate", what, err)
	}

	// SPIFFE identity, with Istio's helpers.
	ids, err := util.ExtractIDs(leaf.Extensions)
	if err != nil {
		return nil, reject("istio pki/util.ExtractIDs", what, err)
	}
	var spiffeIDs []string
	for _, id := range ids {
		if strings.HasPrefix(id, spiffe.URIPrefix) {
			spiffeIDs = append(spiffeIDs, id)
		}
	}
	if len(spiffeIDs) != 1 {
		return nil, rejectf("istio pki/util.ExtractIDs", what, "leaf SAN identities %v hold %d spiffe:// identities, want exactly one", ids, len(spiffeIDs))
	}
	ids = spiffeIDs
	ident, err := spiffe.ParseIdentity(ids[0])
	if err != nil {
		return nil, rejectf("istio pkg/spiffe.ParseIdentity", what, "leaf SAN %q: %v", ids[0], err)
	}
	td, err := spiffe.GetTrustDomainFromURISAN(ids[0])
	if err != nil {
		return nil, reject("istio pkg/spiffe.GetTrustDomainFromURISAN", what, err)
	}
	if td != trustDomain {
		return nil, rejectf("istio pkg/spiffe.GetTrustDomainFromURISAN", what, "leaf trust domain %q, want %q", td, trustDomain)
	}
	res.ID = ident.String()
	if expectID != "" {
		want, err := spiffe.ParseIdentity(expectID)
		if err != nil {
			return nil, usagef("--expect-id %q: istio pkg/spiffe.ParseIdentity: %v", expectID, err)
		}
		if ident != want || ids[0] != expectID {
			return nil, rejectf("istio pkg/spiffe.ParseIdentity", what, "leaf identity %q, want %q", ids[0], expectID)
		}
	}
	// Istio's SPIFFE peer verification: trust domain -> trust bundle.
	v := spiffe.NewPeerCertVerifier()
	if err := v.AddMappingFromPEM(trustDomain, trustBundlePEM); err != nil {
		return nil, reject("istio pkg/spiffe.PeerCertVerifier.AddMappingFromPEM", what, err)
	}
	raw := make([][]byte, 0, len(path))
	for _, c := range path {
		raw = append(raw, c.Raw)
	}
	if err := v.VerifyPeerCert(raw, nil); err != nil {
		return nil, rejectf("istio pkg/spiffe.PeerCertVerifier.VerifyPeerCert", what, "%v (leaf URI SANs %v, trust domain %q mapped to the trust bundle)", err, leaf.URIs, trustDomain)
	}
	return res, nil
}
