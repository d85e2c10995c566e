// Command ferretdb is a minimal launcher for embedded FerretDB on SQLite or PostgreSQL,
// used only by the Deploy Reactor test harness (tests/infra/testenv.py).
//
// The upstream cmd/ferretdb cannot be built with `go install` (it panics on a
// missing build/version/version.txt), so we embed the library instead.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listenAddr := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on (empty: none)")
	handler := flag.String("handler", "sqlite", "backend: sqlite or postgresql")
	sqliteDir := flag.String("sqlite-dir", "data", "directory for SQLite database files (sqlite handler)")
	postgresqlURL := flag.String(
		"postgresql-url", "", "PostgreSQL URL, e.g. postgres://127.0.0.1:5432/ferretdb (postgresql handler)",
	)
	logLevel := flag.String("log-level", "info", "log level: debug, info, warn, error")
	listenTLS := flag.String("listen-tls", "", "TLS address to listen on (with -listen-tls-cert-file and -key-file)")
	tlsCert := flag.String("listen-tls-cert-file", "", "server certificate (PEM) for -listen-tls")
	tlsKey := flag.String("listen-tls-key-file", "", "server private key (PEM) for -listen-tls")
	tlsCA := flag.String("listen-tls-ca-file", "", "CA (PEM) that client certificates must verify against (mutual TLS)")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "invalid -log-level %q: %v\n", *logLevel, err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	config := &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{
			TCP:         *listenAddr,
			TLS:         *listenTLS,
			TLSCertFile: *tlsCert,
			TLSKeyFile:  *tlsKey,
			TLSCAFile:   *tlsCA,
		},
		Logger:  logger,
		Handler: *handler,
	}
	var backend []any
	switch *handler {
	case "sqlite":
		dir, err := filepath.Abs(*sqliteDir)
		if err != nil {
			logger.Error("bad -sqlite-dir", "error", err)
			os.Exit(2)
		}
		if err = os.MkdirAll(dir, 0o755); err != nil {
			logger.Error("cannot create -sqlite-dir", "error", err)
			os.Exit(1)
		}
		// WAL without an fsync per commit: a test server, where durability across power loss does not matter
		// and per-commit fsyncs would make every write cost milliseconds.
		config.SQLiteURL = "file:" + dir + "/?_pragma=synchronous(normal)"
		backend = []any{"sqlite-dir", dir}
	case "postgresql":
		if *postgresqlURL == "" {
			logger.Error("-postgresql-url is required with -handler postgresql")
			os.Exit(2)
		}
		config.PostgreSQLURL = *postgresqlURL
		backend = []any{"postgresql-url", *postgresqlURL}
	default:
		fmt.Fprintf(os.Stderr, "invalid -handler %q: sqlite or postgresql\n", *handler)
		os.Exit(2)
	}

	f, err := ferretdb.New(config)
	if err != nil {
		logger.Error("cannot start FerretDB", "error", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	logger.Info(
		"FerretDB listening",
		append([]any{"addr", *listenAddr, "tls", *listenTLS, "handler", *handler}, backend...)...,
	)
	if err = f.Run(ctx); err != nil {
		logger.Error("FerretDB stopped with error", "error", err)
		os.Exit(1)
	}
	logger.Info("FerretDB stopped")
}
