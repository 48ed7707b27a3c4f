package main

// Keys and certificates: the token issuer's ES256 key (its self-signed certificate is
// the upstream registry's rootcertbundle) and a TLS certificate for 127.0.0.1.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

func cmdKeygen(args []string) error {
	fs := flag.NewFlagSet("keygen", flag.ExitOnError)
	dir := fs.String("dir", ".", "where to write token.key/token.crt and tls.key/tls.crt")
	fs.Parse(args)
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	if err := writeSelfSigned(filepath.Join(*dir, "token"), "registry-gateway bench tokens", nil); err != nil {
		return err
	}
	return writeSelfSigned(filepath.Join(*dir, "tls"), "127.0.0.1",
		[]net.IP{net.ParseIP("127.0.0.1")})
}

func writeSelfSigned(base, cn string, ips []net.IP) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-24 * time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:           ips,
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(base+".key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(base+".crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func tlsConfig(caFile, serverName string) (*tls.Config, error) {
	conf := &tls.Config{ServerName: serverName, ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	if caFile != "" {
		pemBytes, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemBytes) {
			return nil, errors.New("no certificate in " + caFile)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}

// ---------------------------------------------------------------- token issuer

type issuer struct {
	key     *ecdsa.PrivateKey
	certDER []byte
	service string
	name    string
}

func loadIssuer(keyFile, certFile, service, name string) (*issuer, error) {
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	key, ok := kp.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("token key is not ECDSA")
	}
	return &issuer{key: key, certDER: kp.Certificate[0], service: service, name: name}, nil
}

func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// issue signs an ES256 JWT the way Docker Hub's token service does (x5c header).
func (is *issuer) issue(access []map[string]any, lifetime time.Duration) (string, error) {
	now := time.Now()
	header, _ := json.Marshal(map[string]any{
		"typ": "JWT", "alg": "ES256",
		"x5c": []string{base64.StdEncoding.EncodeToString(is.certDER)},
	})
	var jti [16]byte
	rand.Read(jti[:])
	claims, _ := json.Marshal(map[string]any{
		"iss": is.name, "sub": "", "aud": is.service,
		"exp": now.Add(lifetime).Unix(), "nbf": now.Add(-10 * time.Second).Unix(),
		"iat": now.Unix(), "jti": b64url(jti[:]), "access": access,
	})
	signing := b64url(header) + "." + b64url(claims)
	digest := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, is.key, digest[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + b64url(sig), nil
}
