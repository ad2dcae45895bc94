// A minimal forward proxy on github.com/elazarl/goproxy, the peer scripts/bench compares baton
// with. Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o goproxy-bench main.go
package main

import (
	"flag"
	"io"
	"log"
	"net/http"

	"github.com/elazarl/goproxy"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8081", "listen address")
	flag.Parse()
	proxy := goproxy.NewProxyHttpServer()
	proxy.Verbose = false
	proxy.Logger = log.New(io.Discard, "", 0)
	log.Fatal(http.ListenAndServe(*addr, proxy))
}
