#!/usr/bin/env bash
# Make the image's OS base (Ubuntu 24.04 "noble", minbase) locally with debootstrap and import it into buildah's
# storage, for building docker/Dockerfile where no container registry is reachable (docker/build-check.sh uses it):
#
#   bash docker/make-base.sh                                   # -> localhost/suzak-base:ubuntu24.04
#   buildah --storage-driver vfs bud --isolation chroot --format docker \
#       --build-arg BASE_IMAGE=localhost/suzak-base:ubuntu24.04 -f docker/Dockerfile .
#
# Same release, same archive and the same packages as the registry's ubuntu:24.04, built from the archive itself
# (main + universe; noble-updates and noble-security enabled like the official image). It is not that image byte
# for byte: debootstrap's minbase set is a little larger than Canonical's minimized rootfs.
#
# Trust: Debian ships no Ubuntu keyring, so the script fetches noble's ubuntu-keyring .deb and accepts it only if
# its SHA-256 is the one pinned below (the file noble's release pocket lists) and it holds the archive's signing
# key (fingerprint pinned below); debootstrap then verifies the archive with it.
#
# This machine's trust store: where HTTPS goes through a TLS-intercepting proxy (as on the project's own
# machines), pip and uv inside the build must trust its CA as the host does. So the host's CA bundle (HOST_CA,
# default /etc/ssl/certs/ca-certificates.crt; HOST_CA= to leave it out) goes into the local base as an extra
# CA (kept by the image's later `apt-get install ca-certificates`), with /etc/pip.conf pointing pip at the system
# bundle and /etc/uv/uv.toml telling uv to use it (system-certs). Only this local base carries them: the shipped
# image starts from the registry's ubuntu:24.04.
#
# Environment: STORAGE_DRIVER (vfs), UBUNTU_MIRROR (default: debootstrap's own Ubuntu mirror), HOST_CA, FORCE=1
# rebuilds an existing tag. Needs root, debootstrap, buildah, curl, gpg (apt-get install debootstrap buildah curl gpg).
set -euo pipefail

TAG="${1:-localhost/suzak-base:ubuntu24.04}"
SUITE=noble
STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
KEYRING_DEB="pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb"
KEYRING_DEB_SHA256="36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8"
ARCHIVE_KEY_FPR="F6ECB3762474EDA9D21B7022871920D1991BC93C"   # Ubuntu Archive Automatic Signing Key (2018)
# debootstrap before 1.0.134 (Debian 12's) has no `noble` script; noble follows gutsy's rules, as newer ones say.
SCRIPT=/usr/share/debootstrap/scripts/gutsy
# Its amd64 mirror for current releases (the lines naming old-releases or ports are for other cases).
MIRROR="${UBUNTU_MIRROR:-$(awk '$1 == "default_mirror" && $2 !~ /old-releases|ports/ {print $2; exit}' "$SCRIPT")}"
bah=(buildah --storage-driver "$STORAGE_DRIVER")

if [[ "${FORCE:-0}" != 1 ]] && "${bah[@]}" inspect --type image "$TAG" >/dev/null 2>&1; then
    echo "make-base: $TAG exists (FORCE=1 to rebuild)"
    exit 0
fi
for tool in debootstrap buildah curl gpg dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "make-base: $tool is missing (apt-get install debootstrap buildah curl gpg)" >&2; exit 1; }
done

work="$(mktemp -d /var/tmp/suzak-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "== make-base: keyring ($KEYRING_DEB)"
curl -fsS --retry 3 -o "$work/keyring.deb" "$MIRROR/$KEYRING_DEB"
echo "$KEYRING_DEB_SHA256  $work/keyring.deb" | sha256sum --check --quiet
dpkg-deb -x "$work/keyring.deb" "$work/keyring"
keyring="$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg"
gpg --show-keys --with-colons "$keyring" 2>/dev/null | grep -q "^fpr:*$ARCHIVE_KEY_FPR:" \
    || { echo "make-base: the keyring lacks the archive key $ARCHIVE_KEY_FPR" >&2; exit 1; }

echo "== make-base: debootstrap $SUITE (minbase, main + universe)"
rootfs="$work/rootfs"
debootstrap --variant=minbase --components=main,universe --keyring="$keyring" \
    "$SUITE" "$rootfs" "$MIRROR" "$SCRIPT" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# As the official image: the release plus its updates and security pockets, all four components, and no
# man pages or docs from later installs (Canonical's minimized images exclude them the same way).
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates $SUITE-security
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
if [[ ! -f "$rootfs/usr/share/keyrings/ubuntu-archive-keyring.gpg" ]]; then
    install -D -m 0644 "$keyring" "$rootfs/usr/share/keyrings/ubuntu-archive-keyring.gpg"
fi
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/info/*
EOF
HOST_CA="${HOST_CA-/etc/ssl/certs/ca-certificates.crt}"
if [[ -n "$HOST_CA" ]]; then
    install -D -m 0644 "$HOST_CA" "$rootfs/usr/local/share/ca-certificates/build-host.crt"
    install -D -m 0644 "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    install -d "$rootfs/etc/uv"
    printf 'system-certs = true\n' >"$rootfs/etc/uv/uv.toml"
fi
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/tmp/*

echo "== make-base: import as $TAG"
tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .
rm -rf "$rootfs"
ctr="$("${bah[@]}" from scratch)"
"${bah[@]}" add --quiet "$ctr" "$work/rootfs.tar" /
"${bah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
    --label org.opencontainers.image.ref.name=ubuntu --label org.opencontainers.image.version=24.04 \
    --label io.suzak.base="debootstrap $SUITE minbase (docker/make-base.sh)" \
    --label io.suzak.base.host-ca="${HOST_CA:-none}" "$ctr"
"${bah[@]}" commit --rm --quiet "$ctr" "$TAG" >/dev/null
echo "make-base: $TAG in $((SECONDS - start)) s ($("${bah[@]}" images --format '{{.Size}}' "$TAG"))"
