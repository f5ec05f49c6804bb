package main

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"istio.io/istio/pkg/spiffe"
	"istio.io/istio/security/pkg/pki/ca"
	"istio.io/istio/security/pkg/pki/util"
)

// istiod's plug-in CA defaults (pilot/pkg/features / pilot/pkg/bootstrap):
// DEFAULT_WORKLOAD_CERT_TTL 24h, MAX_WORKLOAD_CERT_TTL 90d, CITADEL_SELF_SIGNED_CA_RSA_KEY_SIZE 2048.
const (
	istiodDefaultCertTTL = 24 * time.Hour
	istiodMaxCertTTL     = 90 * 24 * time.Hour
	istiodCARSAKeySize   = 2048
)

// signingFileBundle mirrors pilot/pkg/bootstrap.detectSigningCABundleAndCRL
// (unexported, and that package is all of istiod): the kubernetes.io/tls layout
// (tls.crt, tls.key, ca.crt) wins when tls.crt exists, otherwise the istiod
// layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem); ca-crl.pem is
// passed when present, as with istiod's default PILOT_ENABLE_CA_CRL=true.
func signingFileBundle(dir string) (ca.SigningCAFileBundle, string) {
	tlsCert := filepath.Join(dir, ca.TLSSecretCACertFile)
	if _, err := os.Stat(tlsCert); err == nil {
		return ca.SigningCAFileBundle{
			RootCertFile:    filepath.Join(dir, ca.TLSSecretRootCertFile),
			CertChainFiles:  []string{tlsCert, filepath.Join(dir, ca.TLSSecretRootCertFile)},
			SigningCertFile: tlsCert,
			SigningKeyFile:  filepath.Join(dir, ca.TLSSecretCAPrivateKeyFile),
		}, "kubernetes.io/tls"
	}
	fb := ca.SigningCAFileBundle{
		RootCertFile:    filepath.Join(dir, ca.RootCertFile),
		CertChainFiles:  []string{filepath.Join(dir, ca.CertChainFile)},
		SigningCertFile: filepath.Join(dir, ca.CACertFile),
		SigningKeyFile:  filepath.Join(dir, ca.CAPrivateKeyFile),
	}
	if crl := filepath.Join(dir, ca.CACRLFile); fileExists(crl) {
		fb.CRLFile = crl
	}
	return fb, "istiod"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

type cacertsResult struct {
	Dir       string
	Layout    string
	Signing   *x509.Certificate
	RootCount int
	ChainLen  int
	// ChainEndsAtRoot: cert-chain.pem's last cert is a root from root-cert.pem
	// (meshca's DESIGN §3.1 layout; Istio itself does not require it).
	ChainEndsAtRoot bool
	RootPEM         []byte
	TestLeaf        *responseResult
}

func (r *cacertsResult) summary() string {
	return fmt.Sprintf("OK check-cacerts %s: layout=%s signing-cert subject=%q serial=%s notAfter=%s chain-certs=%d chain-ends-at-root=%t roots=%d; "+
		"istiod IstioCA.Sign test leaf %s verified (leaf→chain→root, serverAuth+clientAuth)",
		r.Dir, r.Layout, r.Signing.Subject.String(), serialHex(r.Signing), r.Signing.NotAfter.UTC().Format(time.RFC3339),
		r.ChainLen, r.ChainEndsAtRoot, r.RootCount, r.TestLeaf.ID)
}

// checkCacertsDir loads DIR exactly the way istiod loads plugged-in certs at
// start-up (security/pkg/pki/ca.NewPluggedCertIstioCAOptions, which calls
// security/pkg/pki/util.NewVerifiedKeyCertBundleFromFile and then requires the
// signing cert to be a CA), builds istiod's IstioCA from it, signs a workload
// CSR with Istio's own signer and runs the istiod-shaped response through the
// same agent-side checks as request-cert.
func checkCacertsDir(dir, trustDomain string) (*cacertsResult, error) {
	fb, layout := signingFileBundle(dir)
	res := &cacertsResult{Dir: dir, Layout: layout}
	if fb.CRLFile != "" {
		res.Layout += "+crl"
	}

	// 1. The bundle loader (partial bundle, chain to root, key match, CRL signers).
	bundle, err := util.NewVerifiedKeyCertBundleFromFile(fb.SigningCertFile, fb.SigningKeyFile, fb.CertChainFiles, fb.RootCertFile, fb.CRLFile)
	if err != nil {
		return nil, reject("istio pki/util.NewVerifiedKeyCertBundleFromFile", dir, err)
	}
	// 2. istiod's plug-in CA constructor (adds: the signing cert must be a CA).
	caOpts, err := ca.NewPluggedCertIstioCAOptions(fb, istiodDefaultCertTTL, istiodMaxCertTTL, istiodCARSAKeySize)
	if err != nil {
		return nil, reject("istio pki/ca.NewPluggedCertIstioCAOptions", dir, err)
	}
	// 3. The CA itself (fails when the cert chain has expired).
	istioCA, err := ca.NewIstioCA(caOpts)
	if err != nil {
		return nil, reject("istio pki/ca.NewIstioCA", dir, err)
	}

	signing, _, chainPEM, rootPEM := bundle.GetAll()
	res.Signing = signing
	res.RootPEM = rootPEM
	roots, _, err := util.ParsePemEncodedCertificateChain(rootPEM)
	if err != nil {
		return nil, reject("istio pki/util.ParsePemEncodedCertificateChain", fb.RootCertFile, err)
	}
	res.RootCount = len(roots)
	chain, _, err := util.ParsePemEncodedCertificateChain(chainPEM)
	if err != nil {
		return nil, reject("istio pki/util.ParsePemEncodedCertificateChain", strings.Join(fb.CertChainFiles, "+"), err)
	}
	res.ChainLen = len(chain)
	for _, r := range roots {
		if chain[len(chain)-1].Equal(r) {
			res.ChainEndsAtRoot = true
		}
	}
	if _, err := bundle.ExtractCACertExpiryTimestamp(); err != nil {
		return nil, reject("istio pki/util.KeyCertBundle.ExtractCACertExpiryTimestamp", dir, err)
	}
	if _, err := bundle.ExtractRootCertExpiryTimestamp(); err != nil {
		return nil, reject("istio pki/util.KeyCertBundle.ExtractRootCertExpiryTimestamp", dir, err)
	}

	// 4. Sign a workload certificate with istiod's signer, shaped like
	// security/pkg/server/ca.Server.CreateCertificate's response.
	id := spiffe.Identity{TrustDomain: trustDomain, Namespace: "default", ServiceAccount: "sleep"}.String()
	csrPEM, keyPEM, err := util.GenCSR(util.CertOptions{Host: id, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		return nil, reject("istio pki/util.GenCSR", "a test CSR", err)
	}
	leafPEM, err := istioCA.Sign(csrPEM, ca.CertOpts{SubjectIDs: []string{id}, TTL: time.Hour})
	if err != nil {
		return nil, reject("istio pki/ca.IstioCA.Sign", dir, err)
	}
	resp := istiodResponse(leafPEM, chainPEM, rootPEM)
	tl, err := checkResponse(resp, keyPEM, rootPEM, trustDomain, id, "istiod's response signed with "+dir)
	if err != nil {
		return nil, err
	}
	res.TestLeaf = tl
	return res, nil
}

// istiodResponse builds IstioCertificateResponse.cert_chain exactly like
// security/pkg/server/ca.Server.CreateCertificate (no CertSigner): the leaf,
// every cert of cert-chain.pem as its own element, then root-cert.pem whole.
func istiodResponse(leafPEM, chainPEM, rootPEM []byte) []string {
	var out []string
	for _, p := range [][]byte{leafPEM, chainPEM} {
		for _, c := range util.PemCertBytestoString(p) {
			out = append(out, c+"\n")
		}
	}
	if len(rootPEM) != 0 {
		out = append(out, string(rootPEM))
	}
	return out
}

func serialHex(c *x509.Certificate) string {
	b := c.SerialNumber.Bytes()
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02X", x)
	}
	return strings.Join(parts, ":")
}

func cmdCheckCacerts(args []string) error {
	fs := newFlagSet("check-cacerts")
	td := fs.String("trust-domain", "cluster.local", "trust domain of the test leaf that istiod's signer issues from each DIR")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("check-cacerts needs at least one DIR")
	}
	for _, dir := range fs.Args() {
		res, err := checkCacertsDir(dir, *td)
		if err != nil {
			return err
		}
		fmt.Println(res.summary())
	}
	return nil
}
