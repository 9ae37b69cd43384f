#!/usr/bin/env sh
# Make sure a Chromium the browser tests can drive is installed (tests/browser.py looks for these names).
# The one place that installs it: `make test` runs this script, and .ci/run only calls `make test`.
# As root with apt-get (CI, containers) it installs Debian's chromium and chromium-driver; with sudo
# and no password prompt it does the same through sudo; otherwise it stops with the exact command.
set -eu
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver"
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "make test: installing Chromium for the browser tests: $cmd"
    sh -c "$cmd" >/dev/null
    chromium --version
    exit 0
  fi
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "make test: installing Chromium for the browser tests: sudo sh -c '$cmd'"
    sudo sh -c "$cmd" >/dev/null
    chromium --version
    exit 0
  fi
fi
echo "make test: the browser tests (tests/test_report.py, tests/test_deployment.py) need Chromium, which is" >&2
echo "not installed and cannot be installed from here (needs root and apt-get). Install it, then rerun:" >&2
echo "  sudo sh -c '$cmd'" >&2
echo "(elsewhere: any Chromium or Google Chrome on PATH as chromium, chromium-browser or google-chrome)" >&2
exit 1
