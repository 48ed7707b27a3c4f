package main

// Pulls: C clients start at once; each resolves the tag, then downloads config and
// layers with P parallel connections (dockerd's max-concurrent-downloads is 3) and
// verifies every digest and size. Also: time to first byte of one blob, cold.

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

const acceptManifests = "Accept: application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.oci.image.index.v1+json, " +
	"application/vnd.docker.distribution.manifest.v2+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json"

type pullResult struct {
	Seconds      float64  `json:"seconds"`
	Bytes        int64    `json:"bytes"`
	Blobs        int      `json:"blobs"`
	Errors       []string `json:"errors"`
	TokenFetches int      `json:"token_fetches"`
}

func fetchBlob(c *Conn, repo string, d Descriptor) (int64, error) {
	scope := "repository:" + repo + ":pull"
	resp, err := Request(c, "GET", "/v2/"+repo+"/blobs/"+d.Digest, scope, nil)
	if err != nil {
		return 0, err
	}
	if resp.Status != 200 {
		body, _ := c.ReadAll(resp, 4096)
		return 0, fmt.Errorf("blob %s: HTTP %d %s", short(d.Digest), resp.Status, strings.TrimSpace(string(body)))
	}
	h := sha256.New()
	n, err := c.Hash(resp, h)
	if err != nil {
		return n, fmt.Errorf("blob %s: %w after %d bytes", short(d.Digest), err, n)
	}
	got := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if got != d.Digest || (d.Size > 0 && n != d.Size) {
		return n, fmt.Errorf("blob %s: got %d bytes hashing to %s", short(d.Digest), n, short(got))
	}
	return n, nil
}

func short(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func pullOnce(t *Target, repo, ref string, parallel int) pullResult {
	started := time.Now()
	res := pullResult{}
	c := NewConn(t)
	defer c.Close()
	resp, err := Request(c, "GET", "/v2/"+repo+"/manifests/"+ref, "repository:"+repo+":pull",
		[]string{acceptManifests})
	if err != nil {
		res.Errors = append(res.Errors, "manifest: "+err.Error())
		return res
	}
	body, err := c.ReadAll(resp, 4<<20)
	if err != nil || resp.Status != 200 {
		res.Errors = append(res.Errors, fmt.Sprintf("manifest: HTTP %d %v %s", resp.Status, err, body))
		return res
	}
	digest := digestOf(body)
	if resp.Digest != "" && resp.Digest != digest {
		res.Errors = append(res.Errors, "manifest digest header "+resp.Digest+" != body "+digest)
	}
	if strings.HasPrefix(ref, "sha256:") && ref != digest {
		res.Errors = append(res.Errors, "manifest body hashes to "+digest)
	}
	var m struct {
		Config Descriptor   `json:"config"`
		Layers []Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		res.Errors = append(res.Errors, "manifest: "+err.Error())
		return res
	}
	res.Bytes += int64(len(body))
	queue := make(chan Descriptor, len(m.Layers)+1)
	queue <- m.Config
	for _, l := range m.Layers {
		queue <- l
	}
	close(queue)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func(first bool) {
			defer wg.Done()
			conn := c
			if !first {
				conn = NewConn(t)
				defer conn.Close()
			}
			for d := range queue {
				n, err := fetchBlob(conn, repo, d)
				mu.Lock()
				res.Bytes += n
				res.Blobs++
				if err != nil {
					res.Errors = append(res.Errors, err.Error())
				}
				mu.Unlock()
			}
		}(w == 0)
	}
	wg.Wait()
	res.Seconds = time.Since(started).Seconds()
	res.TokenFetches = t.Auth.Fetches
	return res
}

func cmdPull(args []string) error {
	fs := flag.NewFlagSet("pull", flag.ExitOnError)
	base := fs.String("url", "", "registry URL")
	ca := fs.String("ca", "", "CA file for https")
	repo := fs.String("repo", "bench/app", "repository")
	ref := fs.String("ref", "latest", "tag or digest")
	clients := fs.Int("clients", 1, "clients pulling at once")
	parallel := fs.Int("parallel", 3, "concurrent blob downloads per client")
	fs.Parse(args)
	t, err := ParseTarget(*base, *ca)
	if err != nil {
		return err
	}
	results := make([]pullResult, *clients)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			results[i] = pullOnce(t.WithAuth(), *repo, *ref, *parallel)
		}(i)
	}
	began := time.Now()
	close(start)
	wg.Wait()
	wall := time.Since(began).Seconds()
	out := map[string]any{"wall_seconds": wall, "clients": *clients}
	var times []float64
	var bytes int64
	var errs []string
	for _, r := range results {
		times = append(times, r.Seconds)
		bytes += r.Bytes
		errs = append(errs, r.Errors...)
	}
	sort.Float64s(times)
	out["client_seconds"] = times
	out["bytes"] = bytes
	out["errors"] = len(errs)
	if len(errs) > 10 {
		errs = errs[:10]
	}
	out["error_samples"] = errs
	return printJSON(out)
}

// ttfb: one cold client (new connection, no token) asks for a blob; the clock stops at
// the first body byte. With -full it reads and verifies the whole blob as well.
func cmdTTFB(args []string) error {
	fs := flag.NewFlagSet("ttfb", flag.ExitOnError)
	base := fs.String("url", "", "registry URL")
	ca := fs.String("ca", "", "CA file for https")
	repo := fs.String("repo", "bench/app", "repository")
	digest := fs.String("digest", "", "blob digest")
	size := fs.Int64("size", 0, "expected size")
	full := fs.Bool("full", false, "read and verify the whole blob")
	fs.Parse(args)
	t, err := ParseTarget(*base, *ca)
	if err != nil {
		return err
	}
	t = t.WithAuth()
	c := NewConn(t)
	defer c.Close()
	began := time.Now()
	out := map[string]any{"errors": 0}
	resp, err := Request(c, "GET", "/v2/"+*repo+"/blobs/"+*digest, "repository:"+*repo+":pull", nil)
	if err != nil {
		out["errors"], out["error_samples"] = 1, []string{err.Error()}
		return printJSON(out)
	}
	if resp.Status != 200 {
		out["errors"], out["error_samples"] = 1, []string{fmt.Sprintf("HTTP %d", resp.Status)}
		return printJSON(out)
	}
	if _, err := c.br.Peek(1); err != nil {
		out["errors"], out["error_samples"] = 1, []string{err.Error()}
		return printJSON(out)
	}
	out["ttfb_seconds"] = time.Since(began).Seconds()
	out["token_fetches"] = t.Auth.Fetches
	var errs []string
	if resp.Digest != "" && resp.Digest != *digest {
		errs = append(errs, "Docker-Content-Digest "+resp.Digest)
	}
	if *size > 0 && resp.ContentLength != *size {
		errs = append(errs, fmt.Sprintf("Content-Length %d", resp.ContentLength))
	}
	if *full {
		h := sha256.New()
		n, err := c.Hash(resp, h)
		got := "sha256:" + hex.EncodeToString(h.Sum(nil))
		if err != nil || got != *digest {
			errs = append(errs, fmt.Sprintf("body: %d bytes, %s, %v", n, short(got), err))
		}
		out["full_seconds"] = time.Since(began).Seconds()
		out["verified"] = err == nil && got == *digest
	}
	out["errors"] = len(errs)
	out["error_samples"] = errs
	return printJSON(out)
}
