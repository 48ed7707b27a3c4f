// benchtool: the Go half of `make bench` (standard library only).
//
//	benchtool keygen  -dir D                     token-signing key and a TLS cert for 127.0.0.1
//	benchtool seed    -registry URL ...          push a random, incompressible image upstream
//	benchtool far     -listen A -upstream URL    throttling proxy + token server (the "far" upstream)
//	benchtool pull    -url URL -repo R -ref T    C clients pull an image at once, verifying digests
//	benchtool ttfb    -url URL -repo R -digest D time to first byte of one blob from a cold client
//	benchtool load    -url URL -requests F       fixed-window load: bytes/s or requests/s, latency
//
// Every command prints one JSON object on stdout; errors are counted, never hidden.
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool keygen|seed|far|pull|ttfb|load [flags]")
		os.Exit(2)
	}
	cmds := map[string]func([]string) error{
		"keygen": cmdKeygen, "seed": cmdSeed, "far": cmdFar, "pull": cmdPull,
		"ttfb": cmdTTFB, "load": cmdLoad,
	}
	cmd, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "benchtool: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err := cmd(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "benchtool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	return enc.Encode(v)
}

func jsonBytes(v any) ([]byte, error) { return json.Marshal(v) }

func jsonIndent(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "   ")
	return append(b, '\n'), err
}
