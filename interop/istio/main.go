// Command istio-interop is meshca's test-only interop harness: it runs meshca's
// outputs through Istio's own Go code (istio.io/istio, istio.io/api) and exits
// non-zero with one line naming the Istio check that rejected what.
//
// It is not shipped; meshca's Rust tests run it as a subprocess.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"istio.io/istio/pkg/log"
)

const usage = `usage: istio-interop <subcommand> [flags] [args]

subcommands:
  check-cacerts [--trust-domain TD] DIR...
  check-rootset OLD_ROOT_PEM NEW_ROOT_PEM
  request-cert --address HOST:PORT --ca-file ROOT_PEM --server-name NAME --token-file FILE
               --trust-domain TD [--cluster-id ID] [--ttl 1h] [--key-type rsa|ec]
               [--expect-id spiffe://...] [--csr-host spiffe://...] [--out-dir DIR] [--timeout 30s]
  check-topology [--timeout 30s] [--key-type rsa|ec] TOPOLOGY_JSON
  spiffe-bundle --trust-domain TD --url https://HOST:PORT/ --ca-file ROOT_PEM [--timeout 10s]

Exit status: 0 all checks passed, 1 a check failed (one line on stderr says which
Istio check rejected what), 2 usage error.
Set ISTIO_INTEROP_LOG_LEVEL (default "none") to see Istio's own logs, e.g. "info".
`

// checkError is a failed interop check: Check names the Istio code that
// rejected Subject; Err is the reason (Istio's own error where there is one).
type checkError struct {
	Check   string
	Subject string
	Err     error
}

func (e *checkError) Error() string {
	return fmt.Sprintf("%s rejected %s: %s", e.Check, e.Subject, oneLine(e.Err.Error()))
}

func (e *checkError) Unwrap() error { return e.Err }

func reject(check, subject string, err error) error {
	return &checkError{Check: check, Subject: subject, Err: err}
}

func rejectf(check, subject, format string, args ...any) error {
	return reject(check, subject, fmt.Errorf(format, args...))
}

// usageError is a bad invocation (exit 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	s = strings.ReplaceAll(s, "\r", "")
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " | ")), " ")
}

func configureIstioLog() {
	level := os.Getenv("ISTIO_INTEROP_LOG_LEVEL")
	if level == "" {
		level = "none"
	}
	o := log.DefaultOptions()
	o.OutputPaths = []string{"stderr"}
	_ = log.Configure(o)
	// Every Istio scope (spiffe, citadelclient, ca, ...) at the chosen level;
	// gRPC's own logs stay off as in Istio's defaults.
	for name, s := range log.Scopes() {
		if name != "grpc" {
			s.SetOutputLevel(log.StringToLevel(level))
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	configureIstioLog()
	sub, args := os.Args[1], os.Args[2:]
	var err error
	switch sub {
	case "check-cacerts":
		err = cmdCheckCacerts(args)
	case "check-rootset":
		err = cmdCheckRootset(args)
	case "request-cert":
		err = cmdRequestCert(args)
	case "check-topology":
		err = cmdCheckTopology(args)
	case "spiffe-bundle":
		err = cmdSpiffeBundle(args)
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		err = usagef("unknown subcommand %q", sub)
	}
	if err == nil {
		return
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "istio-interop %s: usage error: %s\n", sub, oneLine(ue.msg))
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	}
	fmt.Fprintf(os.Stderr, "FAIL istio-interop %s: %s\n", sub, oneLine(err.Error()))
	os.Exit(1)
}

// newFlagSet returns a FlagSet whose parse errors become usage errors.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	return nil
}
