#!/usr/bin/env python3
"""The bank account in Rust, JavaScript and Python, side by side in one run.

Per language: the component's size; the host's start-up time with only that
plugin, cold (empty compile cache: the host compiles it) and warm (cache
hit), from exec to the `plugins ready` line (every plugin compiled and
serving; a large uncached plugin compiles after `listening on`); and the median (and p99) latency
of a deposit over HTTP, measured in one host holding all three plugins with
the requests interleaved round-robin, so that machine load falls on the
three alike. Latency is measured on the embedded (durable, fsync) store and
on the in-memory store, which shows the plugin's own cost.

    make plugins host && python3 scripts/compare-languages.py

Environment: RUNS (start-ups per language, default 3), COMMANDS (deposits
per language and store, default 300). Prints a Markdown table.
"""
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "debug", "rehydra")
PLUGINS = ["bank-account", "bank-account-js", "bank-account-py"]
LANGS = {"bank-account": "Rust", "bank-account-js": "JavaScript", "bank-account-py": "Python"}
RUNS = int(os.environ.get("RUNS", "3"))
COMMANDS = int(os.environ.get("COMMANDS", "300"))


def plugin_file(name):
    path = os.path.join(TARGET, "plugins", f"{name}.wasm")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run `make plugins host` first")
    return path


def start(work, plugins, store, cache):
    """Starts a host on `work` with `plugins`; returns (process, port, seconds to ready)."""
    pdir = os.path.join(work, "plugins")
    shutil.rmtree(pdir, ignore_errors=True)
    os.makedirs(pdir)
    for name in plugins:
        shutil.copy(plugin_file(name), pdir)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [BIN, "run", "--plugins", pdir, "--store", store, "--cache-dir", cache, "--http", "127.0.0.1:0", "--grpc", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    port = None
    for line in proc.stdout:
        if line.startswith("listening on "):
            port = int(line.rsplit(":", 1)[1])
        elif line.strip() == "plugins ready" and port is not None:
            return proc, port, time.perf_counter() - t0
    sys.exit(f"the host did not start with {plugins}")


def stop(proc):
    proc.terminate()
    proc.wait()


def startup_times(name):
    """Median cold and warm start-up of a host with only `name`, in seconds."""
    cold, warm = [], []
    for _ in range(RUNS):
        work = tempfile.mkdtemp(prefix="rehydra-langs-")
        cache = os.path.join(work, "cache")
        try:
            for times in (cold, warm):
                proc, _, secs = start(work, [name], "memory://", cache)
                times.append(secs)
                stop(proc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return statistics.median(cold), statistics.median(warm)


def latencies(store):
    """Deposit round trips per plugin, interleaved, in one host: {name: [seconds]}."""
    work = tempfile.mkdtemp(prefix="rehydra-langs-")
    try:
        if store == "embedded":
            store = "embedded://" + os.path.join(work, "data")
        proc, port, _ = start(work, PLUGINS, store, os.path.join(work, "cache"))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port)

            def post(name, command, body):
                t0 = time.perf_counter()
                conn.request(
                    "POST",
                    f"/v1/aggregates/{name}/acc/commands/{command}",
                    body=json.dumps(body),
                    headers={"content-type": "application/json"},
                )
                resp = conn.getresponse()
                data = resp.read()
                took = time.perf_counter() - t0
                if resp.status != 200:
                    sys.exit(f"{name} {command}: {resp.status} {data!r}")
                return took

            for name in PLUGINS:
                post(name, "open", {"owner": "Ada"})
            # Warm the instance pools and caches before timing.
            for _ in range(20):
                for name in PLUGINS:
                    post(name, "deposit", {"amount": 1})
            out = {name: [] for name in PLUGINS}
            for _ in range(COMMANDS):
                for name in PLUGINS:
                    out[name].append(post(name, "deposit", {"amount": 1}))
            return out
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ms(seconds):
    return f"{seconds * 1000:.2f} ms"


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run `make plugins host` first")
    rows = {}
    for name in PLUGINS:
        print(f"start-up: {name} ({RUNS} runs)…", file=sys.stderr)
        rows[name] = {"size": os.path.getsize(plugin_file(name))}
        rows[name]["cold"], rows[name]["warm"] = startup_times(name)
    for store in ("embedded", "memory://"):
        print(f"latency: {COMMANDS} deposits each, {store} store…", file=sys.stderr)
        for name, samples in latencies(store).items():
            samples.sort()
            rows[name][store] = (statistics.median(samples), samples[int(len(samples) * 0.99) - 1])

    print(f"host: {BIN}; {RUNS} start-ups each (median); {COMMANDS} deposits each, interleaved\n")
    print("| language | component | start-up, cold (compile) | start-up, warm (cache hit) "
          "| deposit median / p99, embedded store | deposit median / p99, memory store |")
    print("|---|---|---|---|---|---|")
    for name in PLUGINS:
        r = rows[name]
        print(
            f"| {LANGS[name]} (`{name}`) | {r['size'] / 1e6:.2f} MB | {r['cold']:.2f} s | {r['warm']:.2f} s "
            f"| {ms(r['embedded'][0])} / {ms(r['embedded'][1])} "
            f"| {ms(r['memory://'][0])} / {ms(r['memory://'][1])} |"
        )


if __name__ == "__main__":
    main()
