package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"sort"
	"strings"

	"istio.io/istio/pkg/util/sets"
)

// Istio's multi-root rule lives in pilot/pkg/bootstrap (istio_ca.go): on a
// cacerts change istiod's handleEvent accepts a different root-cert.pem only with
// ISTIO_MULTIROOT_MESH=true and only when pemBundleHasSubsetRelation(old, new)
// holds, else it logs "Updating new ROOT-CA not supported". That helper and
// pemToRawCertSet are unexported and pilot/pkg/bootstrap is the whole of istiod,
// so they are reimplemented here line for line, on Istio's own
// istio.io/istio/pkg/util/sets: each bundle becomes the set of DER bytes of its
// "CERTIFICATE" PEM blocks (other block types ignored); an empty set never
// qualifies; accepted when one set is a superset of the other. Byte-identical
// files are "no change" for istiod and always accepted.

// pemToRawCertSet mirrors pilot/pkg/bootstrap.pemToRawCertSet.
func pemToRawCertSet(pemData []byte) sets.String {
	certs := sets.New[string]()
	for {
		var block *pem.Block
		block, pemData = pem.Decode(pemData)
		if block == nil {
			break
		}
		if block.Type == "CERTIFICATE" {
			certs.Insert(string(block.Bytes))
		}
	}
	return certs
}

// pemBundleHasSubsetRelation mirrors pilot/pkg/bootstrap.pemBundleHasSubsetRelation.
func pemBundleHasSubsetRelation(a, b []byte) bool {
	certsA := pemToRawCertSet(a)
	certsB := pemToRawCertSet(b)
	if certsA.IsEmpty() || certsB.IsEmpty() {
		return false
	}
	return certsA.SupersetOf(certsB) || certsB.SupersetOf(certsA)
}

const rootSetCheck = "istio pilot/pkg/bootstrap.pemBundleHasSubsetRelation (ISTIO_MULTIROOT_MESH root-set rule, reimplemented)"

// checkRootSetChange applies istiod's rule to a change old -> new and returns
// a description of the relation.
func checkRootSetChange(oldPEM, newPEM []byte, subject, oldLabel, newLabel string) (string, error) {
	for _, p := range []struct {
		name string
		data []byte
	}{{oldLabel, oldPEM}, {newLabel, newPEM}} {
		for _, der := range sets.SortedList(pemToRawCertSet(p.data)) {
			if _, err := x509.ParseCertificate([]byte(der)); err != nil {
				return "", rejectf("crypto/x509.ParseCertificate", subject, "the %s root set holds an unparsable certificate: %v", p.name, err)
			}
		}
	}
	oldSet, newSet := pemToRawCertSet(oldPEM), pemToRawCertSet(newPEM)
	if bytes.Equal(oldPEM, newPEM) {
		if oldSet.IsEmpty() {
			return "", rejectf(rootSetCheck, subject, "root set holds no CERTIFICATE block")
		}
		return fmt.Sprintf("identical (%d roots)", oldSet.Len()), nil
	}
	if !pemBundleHasSubsetRelation(oldPEM, newPEM) {
		if oldSet.IsEmpty() || newSet.IsEmpty() {
			return "", rejectf(rootSetCheck, subject, "Updating new ROOT-CA not supported: a root set holds no CERTIFICATE block (%s=%d %s=%d)", oldLabel, oldSet.Len(), newLabel, newSet.Len())
		}
		return "", rejectf(rootSetCheck, subject,
			"Updating new ROOT-CA not supported: neither root set is a subset of the other (only in %s: %s; only in %s: %s)",
			oldLabel, describeDERs(oldSet.Difference(newSet)), newLabel, describeDERs(newSet.Difference(oldSet)))
	}
	switch {
	case oldSet.Equals(newSet):
		return fmt.Sprintf("equal sets (%d roots, different PEM bytes)", oldSet.Len()), nil
	case newSet.SupersetOf(oldSet):
		return fmt.Sprintf("%s is a superset of %s: adds %s (%d -> %d roots)", newLabel, oldLabel, describeDERs(newSet.Difference(oldSet)), oldSet.Len(), newSet.Len()), nil
	default:
		return fmt.Sprintf("%s is a subset of %s: drops %s (%d -> %d roots)", newLabel, oldLabel, describeDERs(oldSet.Difference(newSet)), oldSet.Len(), newSet.Len()), nil
	}
}

func describeDERs(s sets.String) string {
	var out []string
	for der := range s {
		out = append(out, describeDER([]byte(der)))
	}
	sort.Strings(out)
	return "[" + strings.Join(out, ", ") + "]"
}

func describeDER(der []byte) string {
	sum := sha256.Sum256(der)
	fp := hex.EncodeToString(sum[:])[:16]
	if c, err := x509.ParseCertificate(der); err == nil {
		return fmt.Sprintf("%q sha256:%s", c.Subject.String(), fp)
	}
	return "sha256:" + fp
}

func cmdCheckRootset(args []string) error {
	fs := newFlagSet("check-rootset")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return usagef("check-rootset needs OLD_ROOT_PEM NEW_ROOT_PEM")
	}
	oldPath, newPath := fs.Arg(0), fs.Arg(1)
	oldPEM, err := os.ReadFile(oldPath)
	if err != nil {
		return rejectf(rootSetCheck, oldPath, "cannot read old root set: %v", err)
	}
	newPEM, err := os.ReadFile(newPath)
	if err != nil {
		return rejectf(rootSetCheck, newPath, "cannot read new root set: %v", err)
	}
	rel, err := checkRootSetChange(oldPEM, newPEM, oldPath+" -> "+newPath, "old", "new")
	if err != nil {
		return err
	}
	fmt.Printf("OK check-rootset %s -> %s: %s\n", oldPath, newPath, rel)
	return nil
}
