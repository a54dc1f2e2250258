// probe: the facility suite's network probe, a static binary in a one-layer image (no registry here).
//
//	probe serve ADDR        HTTP server answering "<hostname>\n" (a Service backend)
//	probe get URL           GET URL (TLS not verified: it checks reachability), print status+body; exit 1 unless 2xx
//	probe lookup NAME       resolve NAME with the pod's resolv.conf (cluster DNS); print the addresses
//	probe sha256env NAME    print the sha256 of env NAME (proves a Secret reached the pod without printing it)
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: probe serve|get|lookup|sha256env ARG")
		os.Exit(2)
	}
	arg := os.Args[2]
	switch os.Args[1] {
	case "serve":
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, host) })
		if err := http.ListenAndServe(arg, nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "get":
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		r, err := c.Get(arg)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		body, _ := io.ReadAll(r.Body)
		fmt.Printf("%d %s", r.StatusCode, body)
		if r.StatusCode/100 != 2 {
			os.Exit(1)
		}
	case "lookup":
		addrs, err := net.LookupHost(arg)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println(addrs)
	case "sha256env":
		v, ok := os.LookupEnv(arg)
		if !ok {
			fmt.Println("unset")
			os.Exit(1)
		}
		fmt.Printf("%x\n", sha256.Sum256([]byte(v)))
	default:
		os.Exit(2)
	}
}
