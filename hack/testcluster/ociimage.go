package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"time"
)

// OCI annotations containerd reads when it imports an archive: its own image name wins, the
// ref name is the portable one (skopeo, podman).
const (
	containerdImageNameAnnotation = "io.containerd.image.name"
	ociRefNameAnnotation          = "org.opencontainers.image.ref.name"
)

// runImageFromBinary packs one static binary as a single-layer OCI image archive: the pause
// image of the node's pod sandboxes and the KubeRay operator's image are built this way, from
// binaries built here, with no registry and no image builder.
func runImageFromBinary(args []string) int {
	fs := flag.NewFlagSet("image-from-binary", flag.ContinueOnError)
	binary := fs.String("binary", "", "static binary to pack (required)")
	ref := fs.String("ref", "", "image reference the archive names, e.g. localhost/distill-node/pause:1 (required)")
	out := fs.String("out", "", "OCI archive to write (required; written atomically)")
	inImage := fs.String("path", "", "path of the binary in the image (default: /NAME)")
	user := fs.String("user", "", "user the image runs as, e.g. 65532:65532 (default: root)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *binary == "" || *ref == "" || *out == "" || fs.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: testcluster image-from-binary --binary FILE --ref NAME --out ARCHIVE [--path /NAME] [--user UID:GID]")
		return 2
	}
	target := *inImage
	if target == "" {
		target = "/" + filepath.Base(*binary)
	}
	if err := writeBinaryImage(*binary, target, *ref, *user, *out); err != nil {
		fmt.Fprintf(os.Stderr, "testcluster image-from-binary: %v\n", err)
		return 1
	}
	return 0
}

type blob struct {
	mediaType string
	data      []byte
}

func (b blob) digest() string {
	sum := sha256.Sum256(b.data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b blob) descriptor() map[string]any {
	return map[string]any{"mediaType": b.mediaType, "digest": b.digest(), "size": len(b.data)}
}

func writeBinaryImage(binary, target, ref, user, out string) error {
	content, err := os.ReadFile(binary)
	if err != nil {
		return err
	}
	layerTar, err := tarOf(map[string]tarFile{target: {content, 0o755}})
	if err != nil {
		return err
	}
	diffID := blob{data: layerTar}.digest()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(layerTar); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	layer := blob{"application/vnd.oci.image.layer.v1.tar+gzip", gz.Bytes()}
	imageConfig := map[string]any{"Entrypoint": []string{target}}
	if user != "" {
		imageConfig["User"] = user
	}
	configJSON, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       imageConfig,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
	})
	if err != nil {
		return err
	}
	config := blob{"application/vnd.oci.image.config.v1+json", configJSON}
	manifestJSON, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        config.descriptor(),
		"layers":        []any{layer.descriptor()},
	})
	if err != nil {
		return err
	}
	manifest := blob{"application/vnd.oci.image.manifest.v1+json", manifestJSON}
	entry := manifest.descriptor()
	entry["annotations"] = map[string]string{containerdImageNameAnnotation: ref, ociRefNameAnnotation: ref}
	indexJSON, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []any{entry},
	})
	if err != nil {
		return err
	}
	files := map[string]tarFile{
		"oci-layout": {[]byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644},
		"index.json": {indexJSON, 0o644},
	}
	for _, b := range []blob{layer, config, manifest} {
		files[path.Join("blobs", "sha256", b.digest()[len("sha256:"):])] = tarFile{b.data, 0o644}
	}
	archive, err := tarOf(files)
	if err != nil {
		return err
	}
	return writeAtomically(out, archive)
}

type tarFile struct {
	data []byte
	mode int64
}

// tarOf makes a tar of files (parent folders included), in a fixed order with fixed times so
// that the same binary gives the same image digest.
func tarOf(files map[string]tarFile) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	seen := map[string]bool{}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		rel := name
		if rel[0] == '/' {
			rel = rel[1:]
		}
		for dir := path.Dir(rel); dir != "." && !seen[dir]; dir = path.Dir(dir) {
			seen[dir] = true
			if err := tw.WriteHeader(&tar.Header{Name: dir + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch}); err != nil {
				return nil, err
			}
		}
		f := files[name]
		if err := tw.WriteHeader(&tar.Header{Name: rel, Typeflag: tar.TypeReg, Mode: f.mode, Size: int64(len(f.data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeAtomically(target string, data []byte) error {
	tmp := target + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, target)
}

// archiveImage reads the image reference and manifest digest an OCI archive's index.json names
// (the first manifest with a name).
func archiveImage(archive string) (ref, digest string, err error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return "", "", fmt.Errorf("%s: no index.json (not an OCI archive)", archive)
		}
		if err != nil {
			return "", "", fmt.Errorf("%s: %w", archive, err)
		}
		if path.Clean(h.Name) != "index.json" {
			continue
		}
		var index struct {
			Manifests []struct {
				Digest      string            `json:"digest"`
				Annotations map[string]string `json:"annotations"`
			} `json:"manifests"`
		}
		if err := json.NewDecoder(tr).Decode(&index); err != nil {
			return "", "", fmt.Errorf("%s: index.json: %w", archive, err)
		}
		for _, m := range index.Manifests {
			name := m.Annotations[containerdImageNameAnnotation]
			if name == "" {
				name = m.Annotations[ociRefNameAnnotation]
			}
			if name != "" {
				return name, m.Digest, nil
			}
		}
		return "", "", fmt.Errorf("%s: index.json names no image (no %s annotation)", archive, ociRefNameAnnotation)
	}
}
