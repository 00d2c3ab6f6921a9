#!/usr/bin/env bash
# The end-to-end tests' clients that cannot live in the main virtualenv, installed outside the
# clone and reused: the npm packages of e2e/clients/package.json (linked into
# e2e/clients/node_modules, where Node resolves them from the client scripts), and TGI's
# `text-generation` client in a virtualenv of its own (it pins huggingface-hub below 1.0).
# Idempotent; called by scripts/setup.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${INFERGATE_CACHE:-$HOME/.cache/infergate}"
clients="$repo/e2e/clients"
say() { printf 'setup: %s\n' "$*" >&2; }

command -v npm >/dev/null || { say "npm not found: install Node 20 with npm"; exit 1; }
npm_dir="$cache/clients-npm"
wanted="$(cat "$clients/package.json" "$clients/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$npm_dir/.infergate-stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing the npm clients"
  mkdir -p "$npm_dir"
  cp "$clients/package.json" "$clients/package-lock.json" "$npm_dir/"
  (cd "$npm_dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$wanted" > "$npm_dir/.infergate-stamp"
fi
ln -sfn "$npm_dir/node_modules" "$clients/node_modules"

venv="$cache/clients-venv-text-generation"
requirements="$clients/requirements-text-generation.txt"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.infergate-stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing the text-generation client"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" > "$venv/.infergate-stamp"
fi
