package main

// A minimal HTTP/1.1 client: one keep-alive connection per worker, requests written by
// hand, headers parsed from a large bufio.Reader. Bodies are hashed, kept, or discarded
// in the kernel (splice from the socket to /dev/null) so that the client is not the
// bottleneck when a server sends several GB/s on two cores.

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

const readBuf = 256 << 10

var devNull = func() *os.File {
	f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		panic(err)
	}
	return f
}()

// Target is where requests go: host:port, whether TLS, and the token cache of one client.
type Target struct {
	Addr    string
	Host    string
	TLS     *tls.Config
	Auth    *TokenCache
	Timeout time.Duration
}

func ParseTarget(raw string, caFile string) (*Target, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	t := &Target{Addr: u.Host, Host: u.Host, Timeout: 120 * time.Second}
	if u.Scheme == "https" {
		conf, err := tlsConfig(caFile, u.Hostname())
		if err != nil {
			return nil, err
		}
		t.TLS = conf
	}
	return t, nil
}

// WithAuth returns a copy with its own token cache (a separate client).
func (t *Target) WithAuth() *Target {
	c := *t
	c.Auth = &TokenCache{tokens: map[string]string{}}
	return &c
}

type Response struct {
	Status        int
	ContentLength int64
	Chunked       bool
	Close         bool
	Digest        string // Docker-Content-Digest
	ContentType   string
	Authenticate  string
	Location      string
	body          io.Reader
	remaining     int64
}

type Conn struct {
	t     *Target
	c     net.Conn
	tcp   *net.TCPConn
	br    *bufio.Reader
	wbuf  bytes.Buffer
	buf   []byte
	Fresh bool // the last request opened this connection
	// Deadline, if set, bounds every read and write instead of Target.Timeout.
	Deadline time.Time
}

func NewConn(t *Target) *Conn { return &Conn{t: t, buf: make([]byte, readBuf)} }

func (c *Conn) Close() {
	if c.c != nil {
		c.c.Close()
		c.c, c.tcp, c.br = nil, nil, nil
	}
}

func (c *Conn) dial() error {
	d := net.Dialer{Timeout: 10 * time.Second}
	raw, err := d.Dial("tcp", c.t.Addr)
	if err != nil {
		return err
	}
	c.tcp, _ = raw.(*net.TCPConn)
	c.c = raw
	if c.t.TLS != nil {
		tc := tls.Client(raw, c.t.TLS)
		if err := tc.Handshake(); err != nil {
			raw.Close()
			return err
		}
		c.c, c.tcp = tc, nil
	}
	c.br = bufio.NewReaderSize(c.c, readBuf)
	return nil
}

// Do sends one request and reads the status line and headers. The caller must consume
// the body (Read*, Discard) before the next request. headers are "Name: value" lines.
func (c *Conn) Do(method, path string, headers []string) (*Response, error) {
	return c.DoBody(method, path, headers, nil)
}

// DoBody is Do with a request body (uploads, when seeding).
func (c *Conn) DoBody(method, path string, headers []string, body []byte) (*Response, error) {
	for attempt := 0; ; attempt++ {
		c.Fresh = false
		if c.c == nil {
			if err := c.dial(); err != nil {
				return nil, err
			}
			c.Fresh = true
		}
		if !c.Deadline.IsZero() {
			c.c.SetDeadline(c.Deadline)
		} else if c.t.Timeout > 0 {
			c.c.SetDeadline(time.Now().Add(c.t.Timeout))
		}
		c.wbuf.Reset()
		fmt.Fprintf(&c.wbuf, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: registry-gateway-bench\r\n",
			method, path, c.t.Host)
		for _, h := range headers {
			c.wbuf.WriteString(h)
			c.wbuf.WriteString("\r\n")
		}
		if body != nil {
			fmt.Fprintf(&c.wbuf, "Content-Length: %d\r\n", len(body))
		}
		c.wbuf.WriteString("\r\n")
		_, err := c.c.Write(c.wbuf.Bytes())
		if err == nil && body != nil {
			_, err = c.c.Write(body)
		}
		var resp *Response
		if err == nil {
			resp, err = c.readHead(method)
		}
		if err != nil {
			c.Close()
			// A keep-alive connection the server closed while idle: retry once, fresh.
			if attempt == 0 && !c.Fresh && isStale(err) {
				continue
			}
			return nil, err
		}
		return resp, nil
	}
}

func isStale(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe")
}

func (c *Conn) readHead(method string) (*Response, error) {
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return nil, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return nil, fmt.Errorf("bad status line %q", line)
	}
	// HTTP/1.0 answers are treated as closing the connection.
	r := &Response{Status: status, ContentLength: -1, Close: line[7] == '0'}
	for {
		line, err = c.br.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		if len(line) <= 2 {
			break
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			continue
		}
		name := line[:colon]
		value := string(bytes.TrimSpace(line[colon+1:]))
		switch {
		case asciiEq(name, "content-length"):
			r.ContentLength, _ = strconv.ParseInt(value, 10, 64)
		case asciiEq(name, "transfer-encoding"):
			r.Chunked = strings.Contains(strings.ToLower(value), "chunked")
		case asciiEq(name, "connection"):
			r.Close = strings.EqualFold(value, "close")
		case asciiEq(name, "docker-content-digest"):
			r.Digest = value
		case asciiEq(name, "content-type"):
			r.ContentType = value
		case asciiEq(name, "location"):
			r.Location = value
		case asciiEq(name, "www-authenticate"):
			r.Authenticate = value
		}
	}
	switch {
	case method == "HEAD" || status == 204 || status == 304 || (status >= 100 && status < 200):
		r.remaining = 0
		r.body = bytes.NewReader(nil)
	case r.Chunked:
		r.body = httputil.NewChunkedReader(c.br)
		r.remaining = -1
	case r.ContentLength >= 0:
		r.remaining = r.ContentLength
		r.body = c.br
	default:
		r.Close = true
		r.remaining = -1
		r.body = c.br
	}
	return r, nil
}

func asciiEq(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range b {
		ch := b[i]
		if 'A' <= ch && ch <= 'Z' {
			ch += 'a' - 'A'
		}
		if ch != lower[i] {
			return false
		}
	}
	return true
}

// finish is called after a body was fully read.
func (c *Conn) finish(r *Response) error {
	if r.Chunked {
		// Trailer: lines up to the empty one.
		for {
			line, err := c.br.ReadSlice('\n')
			if err != nil {
				c.Close()
				return err
			}
			if len(line) <= 2 {
				break
			}
		}
	}
	if r.Close {
		c.Close()
	}
	return nil
}

// Read consumes the body in chunks, calling fn for each; fn(nil) is never called.
func (c *Conn) Read(r *Response, fn func([]byte)) (int64, error) {
	var n int64
	if r.remaining >= 0 {
		for n < r.remaining {
			want := int64(len(c.buf))
			if r.remaining-n < want {
				want = r.remaining - n
			}
			k, err := r.body.Read(c.buf[:want])
			if k > 0 {
				fn(c.buf[:k])
				n += int64(k)
			}
			if err != nil {
				c.Close()
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return n, err
			}
		}
		return n, c.finish(r)
	}
	for {
		k, err := r.body.Read(c.buf)
		if k > 0 {
			fn(c.buf[:k])
			n += int64(k)
		}
		if err == io.EOF {
			if !r.Chunked {
				c.Close()
				return n, nil
			}
			return n, c.finish(r)
		}
		if err != nil {
			c.Close()
			return n, err
		}
	}
}

// ReadAll returns the whole body (manifests, tokens, errors: small things).
func (c *Conn) ReadAll(r *Response, limit int64) ([]byte, error) {
	var out []byte
	_, err := c.Read(r, func(b []byte) {
		if int64(len(out)) < limit {
			out = append(out, b...)
		}
	})
	return out, err
}

// Hash reads the body into h; firstByte (if set) is called once the first body byte is there.
func (c *Conn) Hash(r *Response, h hash.Hash) (int64, error) {
	return c.Read(r, func(b []byte) { h.Write(b) })
}

// Discard drops a Content-Length body without copying it to user space where possible:
// splice(2) socket → pipe → /dev/null. Returns the bytes consumed (also on error).
func (c *Conn) Discard(r *Response) (int64, error) {
	if r.remaining < 0 || c.tcp == nil {
		return c.Read(r, func([]byte) {})
	}
	var n int64
	if b := int64(c.br.Buffered()); b > 0 {
		k := b
		if k > r.remaining {
			k = r.remaining
		}
		c.br.Discard(int(k))
		n += k
	}
	if n < r.remaining {
		m, err := devNull.ReadFrom(io.LimitReader(c.tcp, r.remaining-n))
		n += m
		if err == nil && n < r.remaining {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			c.Close()
			return n, err
		}
	}
	return n, c.finish(r)
}

// ---------------------------------------------------------------- token auth

type TokenCache struct {
	mu      sync.Mutex
	tokens  map[string]string
	Fetches int
}

var challengeParam = regexp.MustCompile(`(\w+)="([^"]*)"`)

func (tc *TokenCache) get(key string) string {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.tokens[key]
}

// fetch answers a Bearer challenge the way docker does: GET realm?service=..&scope=..
func (tc *TokenCache) fetch(t *Target, challenge string) (string, error) {
	if !strings.HasPrefix(strings.ToLower(challenge), "bearer ") {
		return "", fmt.Errorf("unsupported challenge %q", challenge)
	}
	params := map[string]string{}
	for _, m := range challengeParam.FindAllStringSubmatch(challenge, -1) {
		params[m[1]] = m[2]
	}
	realm, err := url.Parse(params["realm"])
	if err != nil || params["realm"] == "" {
		return "", fmt.Errorf("challenge without realm: %q", challenge)
	}
	q := realm.Query()
	if params["service"] != "" {
		q.Set("service", params["service"])
	}
	if params["scope"] != "" {
		q.Set("scope", params["scope"])
	}
	realm.RawQuery = q.Encode()
	rt := &Target{Addr: realm.Host, Host: realm.Host, Timeout: 30 * time.Second}
	if realm.Scheme == "https" {
		rt.TLS = t.TLS
	}
	conn := NewConn(rt)
	defer conn.Close()
	resp, err := conn.Do("GET", realm.RequestURI(), nil)
	if err != nil {
		return "", err
	}
	body, err := conn.ReadAll(resp, 1<<20)
	if err != nil {
		return "", err
	}
	if resp.Status != 200 {
		return "", fmt.Errorf("token endpoint answered %d", resp.Status)
	}
	var tok struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(body, &tok); err != nil {
		return "", err
	}
	value := tok.Token
	if value == "" {
		value = tok.AccessToken
	}
	tc.mu.Lock()
	tc.tokens[params["scope"]] = value
	tc.Fetches++
	tc.mu.Unlock()
	return value, nil
}

// Request sends method path with the client's token for scope, answering one 401
// challenge; the returned response's body is the caller's to consume.
func Request(c *Conn, method, path, scope string, headers []string) (*Response, error) {
	send := func(token string) (*Response, error) {
		h := headers
		if token != "" {
			h = append(append([]string(nil), headers...), "Authorization: Bearer "+token)
		}
		return c.Do(method, path, h)
	}
	token := ""
	if c.t.Auth != nil {
		token = c.t.Auth.get(scope)
	}
	resp, err := send(token)
	if err != nil || resp.Status != http.StatusUnauthorized || c.t.Auth == nil || resp.Authenticate == "" {
		return resp, err
	}
	if _, err := c.ReadAll(resp, 1<<20); err != nil {
		return nil, err
	}
	token, err = c.t.Auth.fetch(c.t, resp.Authenticate)
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	return send(token)
}
