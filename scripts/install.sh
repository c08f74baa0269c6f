#!/bin/sh
# banger's installer for released binaries:
#
#   curl -fsSL https://releases.thaloco.com/banger/install.sh | sh
#   sh install.sh [--prefix DIR] [--version V] [--url URL] [--pubkey FILE]
#
# Downloads the release manifest and its signature, checks the signature
# with openssl (ed25519, OpenSSL 3) against the release key below (or
# --pubkey), downloads banger, bangerd, banger-helper and banger-agent for
# this machine, checks each one's size and sha256 against the signed
# manifest, and only then moves them into PREFIX/bin (default /usr/local as
# root, else ~/.local). Anything that does not verify is refused and nothing
# is installed. `banger update` does the same checks later; `banger
# uninstall` removes what this installed. See docs/release.md.
#
#   --prefix DIR   install into DIR/bin
#   --version V    this release instead of the latest
#   --url URL      the release server (default below)
#   --pubkey FILE  trust this ed25519 public key (PEM) instead of banger's
#                  (self-hosted releases); it is installed into
#                  PREFIX/etc/banger/update-keys/ so `banger update` trusts it
set -eu

url="https://releases.thaloco.com/banger"
version=""
pubkey=""
if [ "$(id -u)" = 0 ]; then prefix="/usr/local"; else prefix="${HOME:?HOME is not set}/.local"; fi

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
    --version) [ $# -ge 2 ] || die "--version needs a version"; version="${2#v}"; shift 2 ;;
    --url) [ $# -ge 2 ] || die "--url needs a URL"; url="${2%/}"; shift 2 ;;
    --pubkey) [ $# -ge 2 ] || die "--pubkey needs a file"; pubkey="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# The release key; banger_api::release::RELEASE_PUBLIC_KEY_PEM holds the
# same text (a test keeps them equal).
release_key='-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAhv832wPSsqnQayq9w5sXQSasRS9PMXQ8VQWZXEVE4aU=
-----END PUBLIC KEY-----'

command -v openssl >/dev/null 2>&1 ||
  die "openssl is needed to verify the release signature: install it (Debian/Ubuntu: apt-get install openssl) and run again"
openssl pkeyutl -help 2>&1 | grep -q -- '-rawin' ||
  die "openssl $(openssl version 2>/dev/null | cut -d' ' -f2) cannot verify ed25519 signatures: OpenSSL 3 is needed (Debian 12, Ubuntu 22.04 or later); or build from source (./scripts/install)"
if command -v curl >/dev/null 2>&1; then
  fetch() { curl -fsSL --proto '=http,https' -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
  fetch() { wget -q -O "$2" "$1"; }
else
  die "curl or wget is needed to download the release"
fi

case "$(uname -m)" in
  x86_64|amd64) arch=x86_64 ;;
  aarch64|arm64) arch=aarch64 ;;
  *) die "no banger release for $(uname -m); build from source (./scripts/install)" ;;
esac

tmp=$(mktemp -d)
staging=""
trap 'rm -rf "$tmp"; [ -z "$staging" ] || rm -rf "$staging"' EXIT
trap 'exit 130' INT TERM

dir="${version:-latest}"
fetch "$url/$dir/manifest" "$tmp/manifest" ||
  die "cannot download $url/$dir/manifest: check the network and the URL (--url); nothing was installed"
fetch "$url/$dir/manifest.sig" "$tmp/manifest.sig" ||
  die "cannot download $url/$dir/manifest.sig; nothing was installed"

if [ -n "$pubkey" ]; then
  [ -r "$pubkey" ] || die "cannot read --pubkey $pubkey"
  cp "$pubkey" "$tmp/key.pem"
else
  printf '%s\n' "$release_key" >"$tmp/key.pem"
fi
openssl pkeyutl -verify -pubin -inkey "$tmp/key.pem" -rawin \
    -in "$tmp/manifest" -sigfile "$tmp/manifest.sig" >/dev/null 2>&1 ||
  die "bad signature: $url/$dir/manifest.sig does not verify with $( [ -n "$pubkey" ] && echo "$pubkey" || echo "banger's release key" ); nothing was installed"

# The manifest is signed: from here on its lines are trusted, but still read
# strictly (see banger_api::release for the format).
grep -qx 'format 1' "$tmp/manifest" ||
  die "the release manifest is not format 1: this installer is too old; download the current install.sh"
got_version=$(sed -n 's/^version \([0-9A-Za-z.+-]*\)$/\1/p' "$tmp/manifest")
[ -n "$got_version" ] || die "the release manifest has no version line"
if [ -n "$version" ] && [ "$got_version" != "$version" ]; then
  die "asked for $version but the signed manifest is version $got_version; nothing was installed"
fi

mkdir "$tmp/files"
names=""
grep "^file $arch " "$tmp/manifest" >"$tmp/files.list" ||
  die "release $got_version has no binaries for $arch"
while read -r _kw _arch name size sha; do
  case "$name" in
    ""|.*|*/*|*[!a-z0-9._-]*) die "bad file name '$name' in the manifest" ;;
  esac
  case "$size" in ""|*[!0-9]*) die "bad size for $name in the manifest" ;; esac
  echo "downloading $name ($size bytes)"
  fetch "$url/$got_version/$arch/$name" "$tmp/files/$name" ||
    die "cannot download $url/$got_version/$arch/$name; nothing was installed"
  have=$(wc -c <"$tmp/files/$name" | tr -d ' ')
  [ "$have" = "$size" ] ||
    die "truncated download: $name is $have bytes, the signed manifest says $size; nothing was installed"
  have=$(openssl dgst -sha256 -r "$tmp/files/$name" | cut -d' ' -f1)
  [ "$have" = "$sha" ] ||
    die "sha256 mismatch: $name has $have, the signed manifest says $sha; nothing was installed"
  names="$names $name"
done <"$tmp/files.list"

# Everything verified: stage next to the targets (same filesystem), then
# rename each into place.
bin="$prefix/bin"
mkdir -p "$bin" || die "cannot create $bin (run as root for /usr/local, or pass --prefix)"
staging=$(mktemp -d "$bin/.banger-install.XXXXXX") || die "cannot write to $bin"
for n in $names; do
  cp "$tmp/files/$n" "$staging/$n"
  chmod 0755 "$staging/$n"
done
for n in $names; do
  mv -f "$staging/$n" "$bin/$n" || die "cannot move $n into $bin"
done
if [ -n "$pubkey" ]; then
  keys="$prefix/etc/banger/update-keys"
  mkdir -p "$keys"
  chmod 0755 "$prefix/etc/banger" "$keys"
  cp "$pubkey" "$keys/release.pem"
  chmod 0644 "$keys/release.pem"
  echo "trusting $pubkey for banger update ($keys/release.pem)"
fi

echo "installed banger $got_version into $bin:$names"
[ "$(id -u)" = 0 ] || echo "to run networked VMs as yourself, install the root helper once: sudo $bin/banger system install"
echo "check what this host still needs: $bin/banger doctor (runtime packages: see README, Requirements)"
case ":$PATH:" in
  *":$bin:"*) ;;
  *) echo "add $bin to your PATH (e.g. export PATH=\"$bin:\$PATH\")" ;;
esac
