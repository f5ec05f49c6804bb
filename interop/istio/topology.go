package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"istio.io/istio/pkg/spiffe"
)

// topology is the topology.json that meshca's demo writes.
type topology struct {
	Clusters []topologyCluster `json:"clusters"`
}

type topologyCluster struct {
	Name        string `json:"name"`
	TrustDomain string `json:"trust_domain"`
	CacertsDir  string `json:"cacerts_dir"`
	WorkloadCA  struct {
		Address    string `json:"address"`
		CAFile     string `json:"ca_file"`
		ServerName string `json:"server_name"`
	} `json:"workload_ca"`
	TokenFile string `json:"token_file"`
	// ClusterID is optional; the ClusterID metadata defaults to Name, as a
	// sidecar of a multi-cluster mesh has ISTIO_META_CLUSTER_ID=<cluster name>.
	ClusterID string `json:"cluster_id,omitempty"`
}

func loadTopology(path string) (*topology, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read topology: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var t topology
	if err := dec.Decode(&t); err != nil {
		return nil, fmt.Errorf("bad topology %s: bad JSON: %v", path, err)
	}
	if len(t.Clusters) == 0 {
		return nil, fmt.Errorf("bad topology %s: no clusters", path)
	}
	seen := map[string]bool{}
	for i, c := range t.Clusters {
		for _, f := range []struct{ name, v string }{
			{"name", c.Name}, {"trust_domain", c.TrustDomain}, {"cacerts_dir", c.CacertsDir},
			{"workload_ca.address", c.WorkloadCA.Address}, {"workload_ca.ca_file", c.WorkloadCA.CAFile},
			{"workload_ca.server_name", c.WorkloadCA.ServerName}, {"token_file", c.TokenFile},
		} {
			if f.v == "" {
				return nil, fmt.Errorf("bad topology %s: clusters[%d] (%q) has no %s", path, i, c.Name, f.name)
			}
		}
		if seen[c.Name] {
			return nil, fmt.Errorf("bad topology %s: cluster %q listed twice", path, c.Name)
		}
		seen[c.Name] = true
	}
	return &t, nil
}

type clusterOutcome struct {
	c      topologyCluster
	cacert *cacertsResult
	leaf   *responseResult
}

func cmdCheckTopology(args []string) error {
	fs := newFlagSet("check-topology")
	timeout := fs.Duration("timeout", 30*time.Second, "per-cluster workload CA timeout")
	keyType := fs.String("key-type", "rsa", "workload key type for the CSRs: rsa or ec")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("check-topology needs TOPOLOGY_JSON")
	}
	t, err := loadTopology(fs.Arg(0))
	if err != nil {
		return err
	}

	var outs []clusterOutcome
	for _, c := range t.Clusters {
		cr, err := checkCacertsDir(c.CacertsDir, c.TrustDomain)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", c.Name, err)
		}
		fmt.Printf("cluster %s: %s\n", c.Name, cr.summary())
		clusterID := c.ClusterID
		if clusterID == "" {
			clusterID = c.Name
		}
		expect := spiffe.Identity{TrustDomain: c.TrustDomain, Namespace: "default", ServiceAccount: "sleep"}.String()
		o := requestCertOpts{
			Address: c.WorkloadCA.Address, CAFile: c.WorkloadCA.CAFile, ServerName: c.WorkloadCA.ServerName,
			TokenFile: c.TokenFile, TrustDomain: c.TrustDomain, ClusterID: clusterID, TTL: time.Hour,
			KeyType: *keyType, ExpectID: expect, Timeout: *timeout,
		}
		if err := o.validate(); err != nil {
			return err
		}
		leaf, _, err := requestCert(o)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", c.Name, err)
		}
		fmt.Printf("cluster %s: %s\n", c.Name, leaf.summary("request-cert "+c.WorkloadCA.Address, *keyType))
		outs = append(outs, clusterOutcome{c: c, cacert: cr, leaf: leaf})
	}

	// Root sets: every pair must satisfy istiod's multi-root subset rule
	// (equal, subset or superset), i.e. the mesh is in one rotation phase.
	for i := range outs {
		for j := i + 1; j < len(outs); j++ {
			a, b := outs[i], outs[j]
			rel, err := checkRootSetChange(a.cacert.RootPEM, b.cacert.RootPEM,
				fmt.Sprintf("root-cert.pem of %s vs %s", a.c.Name, b.c.Name), a.c.Name, b.c.Name)
			if err != nil {
				return err
			}
			fmt.Printf("root sets %s vs %s: %s\n", a.c.Name, b.c.Name, rel)
		}
	}

	// Cross-cluster trust: each cluster's workload leaf must verify, with its
	// own intermediates, against every other cluster's root-cert.pem, for both
	// TLS roles (what a peer's Envoy checks on an east-west mTLS handshake).
	for _, a := range outs {
		for _, b := range outs {
			if a.c.Name == b.c.Name {
				continue
			}
			if err := crossVerify(a, b); err != nil {
				return err
			}
		}
	}
	if len(outs) > 1 {
		fmt.Printf("cross-cluster trust: every cluster's leaf verifies against every other cluster's root-cert.pem (serverAuth+clientAuth)\n")
	}
	fmt.Printf("OK check-topology %s: %d cluster(s)\n", fs.Arg(0), len(outs))
	return nil
}

func crossVerify(a, b clusterOutcome) error {
	what := fmt.Sprintf("the leaf of cluster %s (%s) against root-cert.pem of cluster %s", a.c.Name, a.leaf.ID, b.c.Name)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b.cacert.RootPEM) {
		return rejectf("crypto/x509.CertPool.AppendCertsFromPEM", what, "no root certificate")
	}
	inter := x509.NewCertPool()
	inter.AppendCertsFromPEM(a.leaf.CertChainPEM)
	for _, eku := range []struct {
		name  string
		usage x509.ExtKeyUsage
	}{{"ExtKeyUsageClientAuth", x509.ExtKeyUsageClientAuth}, {"ExtKeyUsageServerAuth", x509.ExtKeyUsageServerAuth}} {
		if _, err := a.leaf.Leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{eku.usage}}); err != nil {
			return rejectf("crypto/x509.Certificate.Verify(KeyUsages="+eku.name+") [cross-cluster trust]", what, "%v", err)
		}
	}
	// And the SPIFFE way: peer cluster b maps a's trust domain to b's roots.
	v := spiffe.NewPeerCertVerifier()
	if err := v.AddMappingFromPEM(a.c.TrustDomain, b.cacert.RootPEM); err != nil {
		return reject("istio pkg/spiffe.PeerCertVerifier.AddMappingFromPEM", what, err)
	}
	certs, err := pemCerts(string(a.leaf.CertChainPEM))
	if err != nil {
		return rejectf("istio pkg/spiffe.PeerCertVerifier.VerifyPeerCert", what, "%v", err)
	}
	raw := make([][]byte, 0, len(certs))
	for _, c := range certs {
		raw = append(raw, c.Raw)
	}
	if err := v.VerifyPeerCert(raw, nil); err != nil {
		return reject("istio pkg/spiffe.PeerCertVerifier.VerifyPeerCert [cross-cluster trust]", what, err)
	}
	return nil
}
