// A minimal forward proxy on github.com/elazarl/goproxy, the peer scripts/bench compares baton
// with. Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o goproxy-bench main.go
//
// With -mitm (scripts/bench's inspect section), every CONNECT is bumped (goproxy.AlwaysMitm,
// leaves signed by -ca-cert/-ca-key instead of goproxy's built-in CA), and origins'
// certificates are verified against -origin-ca (goproxy skips verification by default).
// goproxy 1.1 (Debian's) signs only with RSA CAs, and mints a new RSA-2048 leaf per CONNECT.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"io"
	"log"
	"net/http"
	"os"

	"github.com/elazarl/goproxy"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8081", "listen address")
	mitm := flag.Bool("mitm", false, "bump every CONNECT (needs -ca-cert, -ca-key, -origin-ca)")
	caCert := flag.String("ca-cert", "", "PEM: the CA that signs the minted leaves (RSA)")
	caKey := flag.String("ca-key", "", "PEM: its private key")
	originCA := flag.String("origin-ca", "", "PEM: the CA origins' certificates are verified against")
	flag.Parse()
	proxy := goproxy.NewProxyHttpServer()
	proxy.Verbose = false
	proxy.Logger = log.New(io.Discard, "", 0)
	if *mitm {
		ca, err := tls.LoadX509KeyPair(*caCert, *caKey)
		if err != nil {
			log.Fatalf("CA: %v", err)
		}
		if ca.Leaf, err = x509.ParseCertificate(ca.Certificate[0]); err != nil {
			log.Fatalf("CA: %v", err)
		}
		roots := x509.NewCertPool()
		pem, err := os.ReadFile(*originCA)
		if err != nil || !roots.AppendCertsFromPEM(pem) {
			log.Fatalf("origin CA %s: %v", *originCA, err)
		}
		// AlwaysMitm's action signs with TLSConfigFromCA(&goproxy.GoproxyCa): the variable's
		// address, so this CA from here on.
		goproxy.GoproxyCa = ca
		proxy.OnRequest().HandleConnect(goproxy.AlwaysMitm)
		proxy.Tr.TLSClientConfig = &tls.Config{RootCAs: roots}
		// Go's default keeps 2 idle connections per host: with the bench's 32 clients to one
		// origin, most requests would pay a new TLS connection to it. Keep them all.
		proxy.Tr.MaxIdleConnsPerHost = 64
	}
	log.Fatal(http.ListenAndServe(*addr, proxy))
}
