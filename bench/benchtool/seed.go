package main

// Seeding: random, incompressible layers (ChaCha8 from a fixed seed), a real OCI image
// config and manifest, pushed to an open registry with the ordinary upload API.

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
)

const (
	ociManifest = "application/vnd.oci.image.manifest.v1+json"
	ociConfig   = "application/vnd.oci.image.config.v1+json"
	ociLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

type Descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

type SeededImage struct {
	Repository string       `json:"repository"`
	Tag        string       `json:"tag"`
	Manifest   Descriptor   `json:"manifest"`
	Config     Descriptor   `json:"config"`
	Layers     []Descriptor `json:"layers"`
	Size       int64        `json:"size"` // manifest + config + layers
	ExtraBlobs []Descriptor `json:"extra_blobs"`
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func randomBytes(rng *rand.ChaCha8, n int64) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

func pushBlob(t *Target, repo string, data []byte) (string, error) {
	digest := digestOf(data)
	c := NewConn(t)
	defer c.Close()
	resp, err := c.Do("HEAD", "/v2/"+repo+"/blobs/"+digest, nil)
	if err != nil {
		return "", err
	}
	if _, err := c.ReadAll(resp, 0); err != nil {
		return "", err
	}
	if resp.Status == 200 {
		return digest, nil
	}
	resp, err = c.Do("POST", "/v2/"+repo+"/blobs/uploads/", []string{"Content-Length: 0"})
	if err != nil {
		return "", err
	}
	if _, err := c.ReadAll(resp, 1<<20); err != nil {
		return "", err
	}
	if resp.Status != 202 {
		return "", fmt.Errorf("POST upload: HTTP %d", resp.Status)
	}
	loc := resp.Location
	if loc == "" {
		return "", fmt.Errorf("POST upload: no Location")
	}
	if i := strings.Index(loc, "/v2/"); i > 0 {
		loc = loc[i:]
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	resp, err = c.DoBody("PUT", loc+sep+"digest="+digest,
		[]string{"Content-Type: application/octet-stream"}, data)
	if err != nil {
		return "", err
	}
	if _, err := c.ReadAll(resp, 1<<20); err != nil {
		return "", err
	}
	if resp.Status != 201 {
		return "", fmt.Errorf("PUT blob: HTTP %d", resp.Status)
	}
	return digest, nil
}

func cmdSeed(args []string) error {
	fs := flag.NewFlagSet("seed", flag.ExitOnError)
	registry := fs.String("registry", "", "open registry URL")
	repo := fs.String("repo", "bench/app", "repository")
	tag := fs.String("tag", "latest", "tag")
	layers := fs.String("layers-mib", "110,90,70,50,40,25,10,5", "layer sizes in MiB")
	extra := fs.String("extra-mib", "", "sizes of extra blobs (not in the image) in MiB")
	seed := fs.Uint64("seed", 1, "random seed")
	fs.Parse(args)
	t, err := ParseTarget(*registry, "")
	if err != nil {
		return err
	}
	var key [32]byte
	key[0] = byte(*seed)
	key[1] = byte(*seed >> 8)
	rng := rand.NewChaCha8(key)
	out := SeededImage{Repository: *repo, Tag: *tag}
	var diffIDs []string
	for _, s := range strings.Split(*layers, ",") {
		mib, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			return err
		}
		data := randomBytes(rng, int64(mib*(1<<20)))
		digest, err := pushBlob(t, *repo, data)
		if err != nil {
			return err
		}
		out.Layers = append(out.Layers, Descriptor{ociLayer, digest, int64(len(data))})
		diffIDs = append(diffIDs, digestOf(append(data[:0:0], data[:64]...)))
	}
	config, _ := jsonIndent(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config":  map[string]any{"Env": []string{"PATH=/usr/bin"}, "Cmd": []string{"/bin/true"}},
		"rootfs":  map[string]any{"type": "layers", "diff_ids": diffIDs},
		"history": []map[string]any{{"created_by": "registry-gateway bench seed"}},
	})
	cdigest, err := pushBlob(t, *repo, config)
	if err != nil {
		return err
	}
	out.Config = Descriptor{ociConfig, cdigest, int64(len(config))}
	manifest, _ := jsonIndent(map[string]any{
		"schemaVersion": 2, "mediaType": ociManifest, "config": out.Config, "layers": out.Layers,
	})
	c := NewConn(t)
	defer c.Close()
	resp, err := c.DoBody("PUT", "/v2/"+*repo+"/manifests/"+*tag,
		[]string{"Content-Type: " + ociManifest}, manifest)
	if err != nil {
		return err
	}
	if _, err := c.ReadAll(resp, 1<<20); err != nil {
		return err
	}
	if resp.Status != 201 {
		return fmt.Errorf("PUT manifest: HTTP %d", resp.Status)
	}
	out.Manifest = Descriptor{ociManifest, digestOf(manifest), int64(len(manifest))}
	out.Size = out.Manifest.Size + out.Config.Size
	for _, l := range out.Layers {
		out.Size += l.Size
	}
	if *extra != "" {
		for _, s := range strings.Split(*extra, ",") {
			mib, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
			if err != nil {
				return err
			}
			data := randomBytes(rng, int64(mib*(1<<20)))
			digest, err := pushBlob(t, *repo, data)
			if err != nil {
				return err
			}
			out.ExtraBlobs = append(out.ExtraBlobs, Descriptor{"application/octet-stream", digest, int64(len(data))})
		}
	}
	return printJSON(out)
}
