# pinhole — build, demo, test, bench.
GO      ?= go
BIN     := bin
BINS    := pinhole pinhole-broker pinhole-agent
PKGS    := ./...

.PHONY: all build demo test check vet fmt race bench clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/pinhole ./cmd/pinhole-broker ./cmd/pinhole-agent
	$(GO) build -o $(BIN)/pinhole-demo ./test/demo

# The main job end to end on embedded defaults (SQLite, self-generated keys, local target).
demo: build
	$(BIN)/pinhole-demo --bin $(BIN)

# Everything CI runs: formatting, vet, the race-enabled unit tests, the end-to-end tests.
test: check

check: fmt vet
	$(GO) test -race -count=1 -timeout 12m $(PKGS)

fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)

# DESIGN.md's performance table, measured: raw `go test -bench` output goes to
# bench.out, the table to stdout. A missed goal is reported, not a failure;
# a failing benchmark fails the target.
BENCHTIME ?= 2s
bench:
	@echo "running benchmarks (-benchtime $(BENCHTIME)); raw output in bench.out"
	@$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -timeout 10m $(PKGS) > bench.out 2>&1; st=$$?; \
	$(GO) run ./test/benchtable < bench.out || st=1; exit $$st

clean:
	rm -rf $(BIN) bench.out
