// probe: the facility suite's network probe, a static binary in a one-layer image (no registry here).
//
//	probe serve ADDR        HTTP server answering "<hostname>\n" (a Service backend)
//	probe get URL           GET URL (TLS not verified: it checks reachability), print status+body; exit 1 unless 2xx
//	probe lookup NAME       resolve NAME with the pod's resolv.conf (cluster DNS); print the addresses
//	probe sha256env NAME    print the sha256 of env NAME (proves a Secret reached the pod without printing it)
//	probe tls CAFILE HOST:PORT...
//	                        for each target: a TLS handshake verifying the server's certificate
//	                        against CAFILE only, for HOST (the Service's DNS name), must succeed, and
//	                        plain HTTP to it must get no HTTP answer (an error, or the "HTTP
//	                        request to an HTTPS server" 400 of Go's TLS servers);
//	                        one line per check; exit 1 if any check fails (10 s each, never a hang).
//	                        A target "pg:HOST:PORT" is PostgreSQL: TLS after its SSLRequest, and the
//	                        plain check is a startup message that must be refused for "no encryption"
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// checkPostgres: TLS after PostgreSQL's SSLRequest, verified as checkTLS does, then a plain
// (unencrypted) startup message, which pg_hba's hostssl-only lines must refuse.
func checkPostgres(pool *x509.CertPool, target string) bool {
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		fmt.Printf("tls FAIL pg:%s: %v\n", target, err)
		return false
	}
	ok := true
	conn, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err == nil {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}) // SSLRequest
		answer := make([]byte, 1)
		if _, err = io.ReadFull(conn, answer); err == nil && answer[0] != 'S' {
			err = fmt.Errorf("server answered %q to SSLRequest: no TLS", answer)
		}
		if err == nil {
			t := tls.Client(conn, &tls.Config{RootCAs: pool, ServerName: host})
			if err = t.Handshake(); err == nil {
				st := t.ConnectionState()
				fmt.Printf("tls ok pg:%s: %s, certificate %s\n", target, tls.VersionName(st.Version), st.PeerCertificates[0].Subject)
			}
		}
		conn.Close()
	}
	if err != nil {
		fmt.Printf("tls FAIL pg:%s: %v\n", target, err)
		ok = false
	}
	conn, err = net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		fmt.Printf("plain refused pg:%s: %v\n", target, err)
		return ok
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	params := "user\x00visitflow_probe\x00database\x00visitflow_probe\x00\x00"
	msg := make([]byte, 8+len(params))
	binary.BigEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.BigEndian.PutUint32(msg[4:], 196608) // protocol 3.0
	copy(msg[8:], params)
	conn.Write(msg)
	reply, _ := io.ReadAll(io.LimitReader(conn, 2048))
	switch {
	case len(reply) > 0 && reply[0] == 'E' && strings.Contains(string(reply), "no encryption"):
		fmt.Printf("plain refused pg:%s: no pg_hba entry without encryption\n", target)
	case len(reply) == 0:
		fmt.Printf("plain refused pg:%s: connection closed\n", target)
	default:
		fmt.Printf("plain ANSWERED pg:%s: %q\n", target, reply[:min(len(reply), 120)])
		ok = false
	}
	return ok
}

// checkTLS: the handshake against the pool for the target's host name, then plain HTTP to it.
func checkTLS(pool *x509.CertPool, target string) bool {
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		fmt.Printf("tls FAIL %s: %v\n", target, err)
		return false
	}
	ok := true
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", target, &tls.Config{RootCAs: pool, ServerName: host})
	if err != nil {
		fmt.Printf("tls FAIL %s: %v\n", target, err)
		ok = false
	} else {
		st := conn.ConnectionState()
		fmt.Printf("tls ok %s: %s, certificate %s\n", target, tls.VersionName(st.Version), st.PeerCertificates[0].Subject)
		conn.Close()
	}
	plain := &http.Client{Timeout: 10 * time.Second}
	r, err := plain.Get("http://" + target + "/")
	if err != nil {
		fmt.Printf("plain refused %s: %v\n", target, err)
	} else {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 512))
		r.Body.Close()
		// Go's TLS servers (OPA) answer plain HTTP with this 400 and nothing else
		if r.StatusCode == 400 && strings.Contains(string(body), "HTTP request to an HTTPS server") {
			fmt.Printf("plain refused %s: status 400 %q\n", target, strings.TrimSpace(string(body)))
		} else {
			fmt.Printf("plain ANSWERED %s: status %d\n", target, r.StatusCode)
			ok = false
		}
	}
	return ok
}

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
	case "tls":
		pem, err := os.ReadFile(arg)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			fmt.Println("error: no CA certificate in", arg, err)
			os.Exit(1)
		}
		ok := len(os.Args) > 3
		for _, target := range os.Args[3:] {
			if pg, isPg := strings.CutPrefix(target, "pg:"); isPg {
				ok = checkPostgres(pool, pg) && ok
			} else {
				ok = checkTLS(pool, target) && ok
			}
		}
		if !ok {
			os.Exit(1)
		}
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
