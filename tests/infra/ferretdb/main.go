// Command ferretdb is a minimal launcher for embedded FerretDB (SQLite backend),
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
	listenAddr := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	sqliteDir := flag.String("sqlite-dir", "data", "directory for SQLite database files")
	logLevel := flag.String("log-level", "info", "log level: debug, info, warn, error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "invalid -log-level %q: %v\n", *logLevel, err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	dir, err := filepath.Abs(*sqliteDir)
	if err != nil {
		logger.Error("bad -sqlite-dir", "error", err)
		os.Exit(2)
	}
	if err = os.MkdirAll(dir, 0o755); err != nil {
		logger.Error("cannot create -sqlite-dir", "error", err)
		os.Exit(1)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listenAddr},
		Logger:    logger,
		Handler:   "sqlite",
		// WAL without an fsync per commit: a test server, where durability across power loss does not matter
		// and per-commit fsyncs would make every write cost milliseconds.
		SQLiteURL: "file:" + dir + "/?_pragma=synchronous(normal)",
	})
	if err != nil {
		logger.Error("cannot start FerretDB", "error", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	logger.Info("FerretDB listening", "addr", *listenAddr, "sqlite-dir", dir)
	if err = f.Run(ctx); err != nil {
		logger.Error("FerretDB stopped with error", "error", err)
		os.Exit(1)
	}
	logger.Info("FerretDB stopped")
}
