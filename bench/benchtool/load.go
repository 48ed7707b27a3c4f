package main

// Fixed-window load: N keep-alive connections loop over a list of requests until the
// window closes. Bodies are discarded in the kernel (splice), except a sample that is
// hashed and checked against its digest; small bodies (manifests) are always checked.
// The server's CPU time over the window comes from /proc/<pid>/stat.

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type loadRequest struct {
	Method string `json:"method"`
	Path   string `json:"path"`
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	Accept bool   `json:"accept"`
}

const clockTicks = 100 // USER_HZ on Linux

func cpuSeconds(pids []int) float64 {
	total := 0.0
	for _, pid := range pids {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(raw)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		utime, _ := strconv.ParseFloat(fields[11], 64)
		stime, _ := strconv.ParseFloat(fields[12], 64)
		total += (utime + stime) / clockTicks
	}
	return total
}

func selfCPU() float64 { return cpuSeconds([]int{os.Getpid()}) }

// machineBusy is the whole machine's non-idle CPU time (all cores), from /proc/stat.
func machineBusy() float64 {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line := strings.SplitN(string(raw), "\n", 2)[0]
	fields := strings.Fields(line)[1:]
	busy := 0.0
	for i, f := range fields {
		v, _ := strconv.ParseFloat(f, 64)
		if i != 3 && i != 4 && i < 8 { // not idle, not iowait, not guest (counted in user)
			busy += v
		}
	}
	return busy / clockTicks
}

type worker struct {
	bytes     int64
	responses int64
	verified  int64
	errors    []string
	errCount  int64
	latencies []int32 // microseconds
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func cmdLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	base := fs.String("url", "", "server URL")
	ca := fs.String("ca", "", "CA file for https")
	reqFile := fs.String("requests", "", "JSON list of requests")
	conns := fs.Int("conns", 8, "connections")
	duration := fs.Duration("duration", 10*time.Second, "window")
	sample := fs.Int64("sample", 64, "hash and verify 1 in N large bodies")
	pidList := fs.String("pids", "", "server pids whose CPU time is measured")
	auxList := fs.String("aux-pids", "", "pids of the bench's own helpers (not counted as other load)")
	fs.Parse(args)
	t, err := ParseTarget(*base, *ca)
	if err != nil {
		return err
	}
	t.Timeout = 0
	raw, err := os.ReadFile(*reqFile)
	if err != nil {
		return err
	}
	var reqs []loadRequest
	if err := json.Unmarshal(raw, &reqs); err != nil {
		return err
	}
	pids, aux := parsePids(*pidList), parsePids(*auxList)
	workers := make([]*worker, *conns)
	var counter atomic.Int64
	var wg sync.WaitGroup
	ready := make(chan struct{})
	var end time.Time
	// Connect everything first, then open the window.
	connsList := make([]*Conn, *conns)
	for i := range connsList {
		connsList[i] = NewConn(t)
		if err := connsList[i].dial(); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
	}
	for i := range workers {
		workers[i] = &worker{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			w, c := workers[i], connsList[i]
			defer c.Close()
			<-ready
			c.Deadline = end
			c.c.SetDeadline(end)
			addErr := func(msg string) {
				w.errCount++
				if len(w.errors) < 5 {
					w.errors = append(w.errors, msg)
				}
			}
			for k := i; time.Now().Before(end); k++ {
				r := reqs[k%len(reqs)]
				var headers []string
				if r.Accept {
					headers = []string{acceptManifests}
				}
				began := time.Now()
				resp, err := c.Do(r.Method, r.Path, headers)
				if err != nil {
					if isTimeout(err) || !time.Now().Before(end) {
						return
					}
					addErr(err.Error())
					continue
				}
				var n int64
				if resp.Status != 200 {
					body, _ := c.ReadAll(resp, 512)
					if !time.Now().Before(end) {
						return
					}
					addErr(fmt.Sprintf("%s %s: HTTP %d %s", r.Method, r.Path, resp.Status, body))
					continue
				}
				if resp.ContentLength != r.Size {
					addErr(fmt.Sprintf("%s %s: Content-Length %d, want %d", r.Method, r.Path, resp.ContentLength, r.Size))
				}
				if resp.Digest != "" && resp.Digest != r.Digest {
					addErr(fmt.Sprintf("%s %s: Docker-Content-Digest %s", r.Method, r.Path, resp.Digest))
				}
				if r.Method == "GET" {
					if r.Size <= 1<<20 || counter.Add(1)%*sample == 0 {
						h := sha256.New()
						n, err = c.Hash(resp, h)
						if err == nil {
							w.verified++
							if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != r.Digest {
								addErr(fmt.Sprintf("GET %s: body hashes to %s", r.Path, short(got)))
							}
						}
					} else {
						n, err = c.Discard(resp)
					}
					w.bytes += n
					if err != nil {
						if isTimeout(err) || !time.Now().Before(end) {
							return
						}
						addErr(err.Error())
						continue
					}
				} else if _, err := c.ReadAll(resp, 0); err != nil {
					addErr(err.Error())
					continue
				}
				w.responses++
				w.latencies = append(w.latencies, int32(time.Since(began).Microseconds()))
			}
		}(i)
	}
	cpu0, self0, busy0, aux0 := cpuSeconds(pids), selfCPU(), machineBusy(), cpuSeconds(aux)
	began := time.Now()
	end = began.Add(*duration)
	close(ready)
	wg.Wait()
	elapsed := time.Since(began).Seconds()
	cpu1, self1, busy1, aux1 := cpuSeconds(pids), selfCPU(), machineBusy(), cpuSeconds(aux)
	out := map[string]any{"seconds": elapsed, "conns": *conns}
	var bytes, responses, verified, errCount int64
	var errs []string
	var lat []int32
	for _, w := range workers {
		bytes += w.bytes
		responses += w.responses
		verified += w.verified
		errCount += w.errCount
		errs = append(errs, w.errors...)
		lat = append(lat, w.latencies...)
	}
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))]) / 1000
	}
	if len(errs) > 10 {
		errs = errs[:10]
	}
	out["bytes"] = bytes
	out["responses"] = responses
	out["verified"] = verified
	out["errors"] = errCount
	out["error_samples"] = errs
	out["server_cpu_seconds"] = cpu1 - cpu0
	out["client_cpu_seconds"] = self1 - self0
	// CPU time spent by neither the server nor this client: other work on the machine
	// (and kernel threads), which makes the numbers of this window less trustworthy.
	out["other_cpu_seconds"] = (busy1 - busy0) - (cpu1 - cpu0) - (self1 - self0) - (aux1 - aux0)
	out["p50_ms"], out["p90_ms"], out["p99_ms"], out["max_ms"] = pct(0.5), pct(0.9), pct(0.99), pct(1)
	return printJSON(out)
}

func parsePids(list string) []int {
	var pids []int
	for _, p := range strings.Split(list, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(p)); err == nil {
			pids = append(pids, n)
		}
	}
	return pids
}
