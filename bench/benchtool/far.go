package main

// The "far" upstream: a reverse proxy in front of the upstream registry that adds a
// round-trip latency to every request (and one more on each new connection, the TCP
// handshake), paces each connection's response bytes to a fixed rate and, if asked, all
// connections' bytes together to a shared rate (the link behind a CDN), serves the
// Bearer token endpoint itself (behind the same latency), and counts what it sent.

import (
	"context"
	"flag"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type connKey struct{}

type connState struct {
	mu      sync.Mutex
	next    time.Time // when the next byte may leave (pacing)
	greeted atomic.Bool
}

type farStats struct {
	mu          sync.Mutex
	Requests    map[string]int64 `json:"requests"`
	Bytes       map[string]int64 `json:"bytes"`
	Connections int64            `json:"connections"`
}

func (s *farStats) add(kind string, bytes int64, request bool) {
	s.mu.Lock()
	if request {
		s.Requests[kind]++
	}
	s.Bytes[kind] += bytes
	s.mu.Unlock()
}

type far struct {
	proxy   *httputil.ReverseProxy
	latency time.Duration
	rate    float64 // bytes per second per connection; 0 = unlimited
	total   float64 // bytes per second over all connections; 0 = unlimited
	shared  connState
	issuer  *issuer
	stats   *farStats
}

func requestKind(r *http.Request) string {
	p := r.URL.Path
	switch {
	case p == "/token":
		return "token"
	case p == "/v2/" || p == "/v2":
		return "ping"
	case strings.Contains(p, "/manifests/"):
		return "manifest_" + r.Method
	case strings.Contains(p, "/blobs/"):
		return "blob_" + r.Method
	}
	return "other_" + r.Method
}

// pacedWriter paces body bytes to the connection's rate, in 64 KiB slices.
type pacedWriter struct {
	http.ResponseWriter
	f     *far
	conn  *connState
	kind  string
	bytes int64
}

func (w *pacedWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := len(p)
		if n > 64<<10 {
			n = 64 << 10
		}
		wait := pace(w.conn, w.f.rate, n)
		if shared := pace(&w.f.shared, w.f.total, n); shared > wait {
			wait = shared
		}
		if wait > 0 {
			time.Sleep(wait)
		}
		k, err := w.ResponseWriter.Write(p[:n])
		written += k
		w.bytes += int64(k)
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// pace books n bytes at `rate` on `state`'s schedule and says how long to wait before
// sending them (0 for an unlimited rate).
func pace(state *connState, rate float64, n int) time.Duration {
	if rate <= 0 {
		return 0
	}
	state.mu.Lock()
	defer state.mu.Unlock()
	now := time.Now()
	if state.next.Before(now) {
		state.next = now
	}
	wait := state.next.Sub(now)
	state.next = state.next.Add(time.Duration(float64(n) / rate * float64(time.Second)))
	return wait
}

func (w *pacedWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *pacedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (f *far) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/__bench/") {
		f.control(rw, r)
		return
	}
	conn, _ := r.Context().Value(connKey{}).(*connState)
	if conn == nil {
		conn = &connState{}
	}
	delay := f.latency
	if !conn.greeted.Swap(true) {
		delay += f.latency // the TCP handshake's round trip
	}
	time.Sleep(delay)
	kind := requestKind(r)
	w := &pacedWriter{ResponseWriter: rw, f: f, conn: conn, kind: kind}
	if kind == "token" {
		f.token(w, r)
	} else {
		f.proxy.ServeHTTP(w, r)
	}
	f.stats.add(kind, w.bytes, true)
}

func (f *far) token(w http.ResponseWriter, r *http.Request) {
	// Anonymous pull, like a public repository on Docker Hub: every scope gets "pull".
	var access []map[string]any
	for _, scope := range r.URL.Query()["scope"] {
		for _, one := range strings.Fields(scope) {
			parts := strings.Split(one, ":")
			if len(parts) == 3 && parts[0] == "repository" {
				access = append(access, map[string]any{
					"type": "repository", "name": parts[1], "actions": []string{"pull"}})
			}
		}
	}
	if access == nil {
		access = []map[string]any{}
	}
	tok, err := f.issuer.issue(access, 5*time.Minute)
	if err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	body, _ := jsonBytes(map[string]any{"token": tok, "access_token": tok, "expires_in": 300,
		"issued_at": time.Now().UTC().Format(time.RFC3339)})
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

func (f *far) control(w http.ResponseWriter, r *http.Request) {
	f.stats.mu.Lock()
	defer f.stats.mu.Unlock()
	if r.URL.Path == "/__bench/reset" {
		f.stats.Requests = map[string]int64{}
		f.stats.Bytes = map[string]int64{}
		f.stats.Connections = 0
	}
	body, _ := jsonBytes(f.stats)
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

func cmdFar(args []string) error {
	fs := flag.NewFlagSet("far", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address")
	upstream := fs.String("upstream", "", "registry URL")
	latency := fs.Duration("latency", 40*time.Millisecond, "added per request (and per new connection)")
	rate := fs.Float64("rate-mb", 32, "MB/s (10^6) per connection; 0 = unlimited")
	total := fs.Float64("total-mb", 0, "MB/s (10^6) over all connections; 0 = unlimited")
	keyFile := fs.String("token-key", "", "token signing key (PEM)")
	certFile := fs.String("token-cert", "", "token signing certificate (PEM)")
	service := fs.String("service", "bench-registry", "token audience")
	issuerName := fs.String("issuer", "bench-token-issuer", "token issuer")
	fs.Parse(args)
	target, err := url.Parse(*upstream)
	if err != nil {
		return err
	}
	is, err := loadIssuer(*keyFile, *certFile, *service, *issuerName)
	if err != nil {
		return err
	}
	stats := &farStats{Requests: map[string]int64{}, Bytes: map[string]int64{}}
	transport := &http.Transport{
		Proxy: nil, MaxIdleConns: 1024, MaxIdleConnsPerHost: 1024, DisableCompression: true,
		IdleConnTimeout: 90 * time.Second, WriteBufferSize: 256 << 10, ReadBufferSize: 256 << 10,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // the registry builds Location headers from Host
		},
		Transport:     transport,
		FlushInterval: -1,
		BufferPool:    bufPool{},
	}
	f := &far{proxy: rp, latency: *latency, rate: *rate * 1e6, total: *total * 1e6, issuer: is, stats: stats}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler: f,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			stats.mu.Lock()
			stats.Connections++
			stats.mu.Unlock()
			return context.WithValue(ctx, connKey{}, &connState{})
		},
	}
	printJSON(map[string]any{"listen": ln.Addr().String()})
	return srv.Serve(ln)
}

type bufPool struct{}

var pool = sync.Pool{New: func() any { return make([]byte, 64<<10) }}

func (bufPool) Get() []byte  { return pool.Get().([]byte) }
func (bufPool) Put(b []byte) { pool.Put(b) }
