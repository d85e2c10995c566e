// Command pki writes the certificates and keys of a throwaway loopback test cluster into a folder:
// a CA, the API server's serving certificate (127.0.0.1, localhost), an admin client certificate
// (group system:masters) and the service-account signing key. Standard library only.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "pki:", err)
		os.Exit(1)
	}
}

func newKey() *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	return key
}

func writePEM(dir, name, kind string, der []byte) {
	data := pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
	must(os.WriteFile(filepath.Join(dir, name), data, 0o600))
}

func writeKey(dir, name string, key *ecdsa.PrivateKey) {
	der, err := x509.MarshalECPrivateKey(key)
	must(err)
	writePEM(dir, name, "EC PRIVATE KEY", der)
}

var serial int64

func sign(tmpl *x509.Certificate, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) *x509.Certificate {
	serial++
	tmpl.SerialNumber = big.NewInt(serial)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	must(err)
	cert, err := x509.ParseCertificate(der)
	must(err)
	return cert
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: pki <dir>")
		os.Exit(2)
	}
	dir := os.Args[1]
	must(os.MkdirAll(dir, 0o700))

	caKey := newKey()
	ca := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "deploy-reactor-test-ca"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}, nil, &caKey.PublicKey, caKey)
	writePEM(dir, "ca.crt", "CERTIFICATE", ca.Raw)
	writeKey(dir, "ca.key", caKey)

	serverKey := newKey()
	server := sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &serverKey.PublicKey, caKey)
	writePEM(dir, "apiserver.crt", "CERTIFICATE", server.Raw)
	writeKey(dir, "apiserver.key", serverKey)

	adminKey := newKey()
	admin := sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, &adminKey.PublicKey, caKey)
	writePEM(dir, "admin.crt", "CERTIFICATE", admin.Raw)
	writeKey(dir, "admin.key", adminKey)

	saKey := newKey()
	writeKey(dir, "sa.key", saKey)
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	must(err)
	writePEM(dir, "sa.pub", "PUBLIC KEY", saPub)
}
