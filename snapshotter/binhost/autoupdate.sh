#!/bin/sh
# snapshotter-autoupdate: bring this Gentoo host to the build its edition points at: the build's portage
# settings, the very tree the packages were built from (emerge-webrsync --revert) and its signed binary
# packages (emerge -uDNg @world). Written by `snapshotter client-config`; docs/binhost.md, "Clients".
#
# Usage: snapshotter-autoupdate [--force]      (--force: update even when already at the edition's build)
#
# Reads /etc/snapshotter-client.conf (NAME=VALUE lines, no quotes, no spaces):
#   URL=https://10.0.0.6:8443   the edition's endpoint: the document root holding edition.json
#   PROFILE=basic               the build profile and edition this host follows
#   EDITION=production
#   SIGNING_KEY=<fingerprint>   the only key whose signatures count; trusted in /etc/portage/gnupg
#   CERT=/etc/portage/binhost-tls/client.crt    optional, all three or none: this host's client
#   KEY=/etc/portage/binhost-tls/client.key     certificate, its key, and the CA of the server's
#   CA=/etc/portage/binhost-tls/server-ca.crt   certificate
#
# Steps (one line each on stdout): fetch edition.json and its signature (this also checks that the server
# accepts this host's certificate), verify it; stop if this host is already at that build; fetch and verify
# the settings tarball and the snapshot (signature and sha256 from edition.json); only then change the
# host: install the settings into /etc/portage, emerge-webrsync --revert to the build's tag, emerge -uDNg
# @world from the build's packages, record the build in /var/lib/snapshotter-client/build.
# This host's own settings live in /etc/portage/make.conf.local (sourced at the end of the build's
# make.conf; created empty when missing) and in files of the package.* directories not named snapshotter.
# The output of emerge-webrsync and emerge goes to /var/lib/snapshotter-client/update.log.
#
# Exit status:
#   0   updated, or already at the edition's build
#   1   usage or configuration (nothing changed)
#   2   verification failed: a signature or a sha256 (nothing changed)
#   3   download failed, or the server refused this host's certificate (nothing changed)
#   4   emerge-webrsync failed (the settings are the new build's; the tree may be the old one)
#   5   emerge failed (settings and tree are the new build's; packages are not all updated)
#   75  another update is running
# After 4 or 5 the build is not recorded: the next run does the whole update again.
#
# SNAPSHOTTER_CLIENT_ROOT (tests only) is put in front of the paths of this script's own files (the
# configuration, /etc/portage, /var/lib/snapshotter-client); emerge and emerge-webrsync still act on /.

# `a && b || fail ...` below means: fail when any of them fails (shellcheck's SC2015 does not apply).
# shellcheck disable=SC2015
set -u
umask 022
LC_ALL=C
export LC_ALL

PROG=snapshotter-autoupdate
ROOT=${SNAPSHOTTER_CLIENT_ROOT:-}
CONF=$ROOT/etc/snapshotter-client.conf
ETC=$ROOT/etc/portage
GNUPG=$ETC/gnupg
STATE=$ROOT/var/lib/snapshotter-client
LOG=$STATE/update.log
TRIES=3
TIMEOUT=60
MARK='# ---- snapshotter: client settings'

TMP=
LOCKED=
TLS=
NETWORK=0

say() {
    printf '%s: %s\n' "$PROG" "$*"
}

fail() {
    code=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

usage() {
    printf 'usage: %s [--force]\n' "$PROG"
    printf 'Updates this host to the build its edition points at (see /etc/snapshotter-client.conf).\n'
    printf 'Exit status: 0 updated or current, 1 usage/configuration, 2 verification failed,\n'
    printf '3 download failed, 4 emerge-webrsync failed, 5 emerge failed, 75 already running.\n'
}

cleanup() {
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ -d "$TMP/gnupg" ]; then
            gpgconf --homedir "$TMP/gnupg" --kill all >/dev/null 2>&1
        fi
        rm -rf "$TMP"
    fi
    if [ -n "$LOCKED" ]; then
        rm -rf "$STATE/lock"
    fi
}

# ---- configuration ---------------------------------------------------------------------------------------
read_conf() {
    [ -f "$CONF" ] || fail 1 "$CONF not found (snapshotter client-config writes it)"
    [ -r "$CONF" ] || fail 1 "cannot read $CONF"
    URL='' PROFILE='' EDITION='' SIGNING_KEY='' CERT='' KEY='' CA=''
    n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        case $line in
            '' | '#'*) continue ;;
        esac
        name=${line%%=*}
        value=${line#*=}
        [ "$name" != "$line" ] || fail 1 "$CONF line $n: expected NAME=VALUE, got: $line"
        case $value in
            *[!]A-Za-z0-9._:/@%+~,[-]*)
                fail 1 "$CONF line $n: $name may hold only letters, digits and . _ : / @ % + ~ , [ ] -" ;;
        esac
        case $name in
            URL) URL=${value%/} ;;
            PROFILE) PROFILE=$value ;;
            EDITION) EDITION=$value ;;
            SIGNING_KEY) SIGNING_KEY=$value ;;
            CERT) CERT=$value ;;
            KEY) KEY=$value ;;
            CA) CA=$value ;;
            *) fail 1 "$CONF line $n: unknown setting $name (known: URL PROFILE EDITION SIGNING_KEY CERT KEY CA)" ;;
        esac
    done <"$CONF"
    for name in URL PROFILE EDITION SIGNING_KEY; do
        eval "value=\$$name"
        [ -n "$value" ] || fail 1 "$CONF: $name is not set"
    done
    case $URL in
        http://?* | https://?*) ;;
        *) fail 1 "$CONF: URL must start with http:// or https://, got $URL" ;;
    esac
    case $URL in
        */snapshots) fail 1 "$CONF: URL $URL ends in /snapshots: give the edition's root (the URL holding edition.json)" ;;
    esac
    case $SIGNING_KEY in
        *[!0-9A-F]*) fail 1 "$CONF: SIGNING_KEY must be a fingerprint (40 hex digits, upper case), got $SIGNING_KEY" ;;
    esac
    [ "${#SIGNING_KEY}" -eq 40 ] || fail 1 "$CONF: SIGNING_KEY must be a fingerprint (40 hex digits), got $SIGNING_KEY"
    if [ -n "$CERT$KEY$CA" ]; then
        [ -n "$CERT" ] && [ -n "$KEY" ] && [ -n "$CA" ] || fail 1 "$CONF: CERT, KEY and CA go together (all three or none)"
        case $URL in
            https://*) ;;
            *) fail 1 "$CONF: a client certificate (CERT) needs an https:// URL, got $URL" ;;
        esac
        for f in "$CERT" "$KEY" "$CA"; do
            [ -f "$f" ] && [ -r "$f" ] || fail 1 "$CONF: cannot read $f"
        done
    fi
}

pick_fetcher() {
    if command -v wget >/dev/null 2>&1; then
        FETCHER=wget
        [ -z "$CERT" ] || TLS="--certificate=$CERT --private-key=$KEY --ca-certificate=$CA"
    elif command -v curl >/dev/null 2>&1; then
        FETCHER=curl
        [ -z "$CERT" ] || TLS="--cert $CERT --key $KEY --cacert $CA"
    else
        fail 1 "neither wget nor curl is installed"
    fi
    for tool in gpg sha256sum tar xz awk; do
        command -v "$tool" >/dev/null 2>&1 || fail 1 "$tool is not installed"
    done
}

take_lock() {
    mkdir -p "$STATE" || fail 1 "cannot create $STATE"
    if ! mkdir "$STATE/lock" 2>/dev/null; then
        pid=$(cat "$STATE/lock/pid" 2>/dev/null) || pid=
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            fail 75 "another update is running (pid $pid; $STATE/lock)"
        fi
        rm -rf "$STATE/lock"  # left by an update that was killed
        mkdir "$STATE/lock" 2>/dev/null || fail 75 "another update is running ($STATE/lock)"
    fi
    LOCKED=1
    echo $$ >"$STATE/lock/pid"
}

# ---- downloads -------------------------------------------------------------------------------------------
# fetch URL DEST: 0 when DEST holds the file; otherwise REASON says why in one line and NETWORK is 1 when the
# connection or the TLS handshake failed (a server refusing this host's certificate ends there).
fetch() {
    rm -f "$2"
    # TLS holds paths checked to have no spaces: it is split on purpose.
    if [ "$FETCHER" = wget ]; then
        # shellcheck disable=SC2086
        wget --tries="$TRIES" --timeout="$TIMEOUT" $TLS -O "$2" "$1" 2>"$TMP/fetch.err"
    else
        # shellcheck disable=SC2086
        curl -fsS --retry "$((TRIES - 1))" --connect-timeout "$TIMEOUT" --max-time 3600 $TLS -o "$2" "$1" 2>"$TMP/fetch.err"
    fi
    rc=$?
    if [ "$rc" -eq 0 ] && [ -f "$2" ]; then
        return 0
    fi
    rm -f "$2"
    case $FETCHER:$rc in
        wget:4 | wget:5 | curl:6 | curl:7 | curl:28 | curl:35 | curl:56 | curl:58 | curl:60) NETWORK=1 ;;
        *) NETWORK=0 ;;
    esac
    case $FETCHER:$rc in
        wget:4) what='network or TLS failure' ;;
        wget:5) what="the server's certificate does not verify" ;;
        wget:8) what='the server answered with an error' ;;
        curl:22) what='the server answered with an error' ;;
        curl:35 | curl:56 | curl:58) what='TLS failure' ;;
        curl:60) what="the server's certificate does not verify" ;;
        *) what='' ;;
    esac
    # The tool's own last word on it (wget says a lot; keep the line that names the error).
    detail=$(grep -i -E 'error|fail|unable|refused|not found|timed out|invalid|alert|denied' "$TMP/fetch.err" \
        | grep -v -e 'Could not save SSL session' | tail -n 1 \
        | sed 's/^[0-9-]* [0-9:]* //; s/^[[:space:]]*//; s/[[:space:]]*$//')
    REASON="$FETCHER exit $rc${what:+: $what}${detail:+: $detail}"
    return 1
}

fetch_or_fail() {
    fetch "$1" "$2" && return 0
    fail 3 "cannot fetch $1 ($REASON)"
}

# ---- OpenPGP ---------------------------------------------------------------------------------------------
# Portage verifies packages with /etc/portage/gnupg, as the user nobody; this script uses a copy of it and
# trusts only SIGNING_KEY (also for emerge-webrsync, which needs a writable keyring).
setup_keys() {
    [ -d "$GNUPG" ] || fail 1 "$GNUPG does not exist: trust the signing key as the README of client-config says"
    mkdir -m 0700 "$TMP/portage-gnupg" "$TMP/gnupg" || fail 1 "cannot create a temporary keyring in $TMP"
    found=
    for f in pubring.kbx pubring.gpg trustdb.gpg; do
        if [ -f "$GNUPG/$f" ]; then
            cp "$GNUPG/$f" "$TMP/portage-gnupg/$f" || fail 1 "cannot copy $GNUPG/$f"
            case $f in pubring.*) found=1 ;; esac
        fi
    done
    [ -n "$found" ] || fail 1 "$GNUPG has no keyring (pubring.kbx): trust the signing key as the README of client-config says"
    validity=$(gpg --homedir "$TMP/portage-gnupg" --batch --no-tty --no-autostart --with-colons \
        --list-keys "$SIGNING_KEY" 2>/dev/null | awk -F: '$1 == "pub" { print $2; exit }')
    [ -n "$validity" ] || fail 1 "the signing key $SIGNING_KEY is not in $GNUPG: trust it as the README of client-config says"
    case $validity in
        u | f) ;;
        *) fail 1 "the signing key $SIGNING_KEY is in $GNUPG but not trusted (validity '$validity'; Portage needs full or ultimate trust): echo $SIGNING_KEY:6: | gpg --homedir $GNUPG --import-ownertrust" ;;
    esac
    # Portage checks packages as nobody: the keyring must be readable by everyone.
    if [ -z "$(find "$GNUPG" -prune -perm -005 2>/dev/null)" ]; then
        fail 1 "$GNUPG is not readable by others (Portage verifies packages as nobody): chmod -R a+rX $GNUPG"
    fi
    for f in pubring.kbx pubring.gpg trustdb.gpg; do
        if [ -f "$GNUPG/$f" ] && [ -z "$(find "$GNUPG/$f" -prune -perm -004 2>/dev/null)" ]; then
            fail 1 "$GNUPG/$f is not readable by others (Portage verifies packages as nobody): chmod -R a+rX $GNUPG"
        fi
    done
    gpg --homedir "$TMP/portage-gnupg" --batch --no-tty --no-autostart --export "$SIGNING_KEY" \
        >"$TMP/signing-key.gpg" 2>/dev/null && [ -s "$TMP/signing-key.gpg" ] \
        || fail 1 "cannot export $SIGNING_KEY from $GNUPG"
    # gpg --import may exit 2 only because it found no gpg-agent (none is needed here): check the result instead.
    gpg --homedir "$TMP/gnupg" --batch --no-tty --no-autostart --import "$TMP/signing-key.gpg" >/dev/null 2>&1
    echo "$SIGNING_KEY:6:" | gpg --homedir "$TMP/gnupg" --batch --no-tty --no-autostart --import-ownertrust >/dev/null 2>&1
    validity=$(gpg --homedir "$TMP/gnupg" --batch --no-tty --no-autostart --with-colons --list-keys "$SIGNING_KEY" \
        2>/dev/null | awk -F: '$1 == "pub" { print $2; exit }')
    [ "$validity" = u ] || fail 1 "cannot set up a temporary keyring for $SIGNING_KEY in $TMP"
}

# verify DATA SIGNATURE: 0 when SIGNATURE is a good, valid signature of DATA made by SIGNING_KEY.
verify() {
    status=$(gpg --homedir "$TMP/gnupg" --batch --no-tty --no-autostart --status-fd 1 --verify "$2" "$1" 2>/dev/null) || return 1
    case $status in
        *'[GNUPG:] BADSIG'* | *'[GNUPG:] ERRSIG'* | *'[GNUPG:] EXPSIG'* | *'[GNUPG:] EXPKEYSIG'* | \
        *'[GNUPG:] REVKEYSIG'* | *'[GNUPG:] NO_PUBKEY'*) return 1 ;;
    esac
    case $status in
        *'[GNUPG:] GOODSIG'*) ;;
        *) return 1 ;;
    esac
    printf '%s\n' "$status" | awk -v k="$SIGNING_KEY" \
        '$1 == "[GNUPG:]" && $2 == "VALIDSIG" && ($3 == k || $12 == k) { ok = 1 } END { exit !ok }'
}

# ---- edition.json ----------------------------------------------------------------------------------------
# edition.json is written with sorted keys and a 2-space indent: top-level values are on lines
# `  "KEY": "VALUE",`, the sha256 of each file on lines `    "PATH": "SHA256",`.
json_value() {  # INDENT KEY
    awk -v p="$1\"$2\": " 'index($0, p) == 1 {
        v = substr($0, length(p) + 1); sub(/,$/, "", v)
        if (v ~ /^"[^"\\]*"$/) { print substr(v, 2, length(v) - 2) } else { print v }
        exit }' "$TMP/edition.json"
}

matches() {  # VALUE ERE
    printf '%s\n' "$1" | grep -Eqx "$2"
}

read_edition() {
    format=$(json_value '  ' format)
    [ "$format" = 1 ] || fail 1 "edition.json has format '$format'; this script knows format 1 (get a newer one: snapshotter client-config)"
    e_profile=$(json_value '  ' profile)
    e_edition=$(json_value '  ' edition)
    BUILD=$(json_value '  ' build)
    TAG=$(json_value '  ' tag)
    BPATH=$(json_value '  ' path)
    if [ "$e_profile" != "$PROFILE" ] || [ "$e_edition" != "$EDITION" ]; then
        fail 1 "$URL serves edition $e_edition of profile $e_profile, but this host follows $EDITION of $PROFILE ($CONF)"
    fi
    matches "$TAG" '[0-9]{4}-[0-9]{2}-[0-9]{2}' || fail 2 "edition.json: bad tag '$TAG'"
    matches "$BUILD" "$TAG\\.[0-9]+" || fail 2 "edition.json: bad build id '$BUILD'"
    [ "$BPATH" = "b/$BUILD" ] || fail 2 "edition.json: bad path '$BPATH'"
    DAY=$(printf '%s' "$TAG" | sed 's/-//g')
}

sha_of() {  # PATH under b/<build>/: its sha256 from edition.json
    v=$(json_value '    ' "$1")
    matches "$v" '[0-9a-f]{64}' || fail 2 "edition.json lists no sha256 for $1"
    printf '%s\n' "$v"
}

# fetch_verified REL: fetch URL/b/<build>/REL into $TMP/REL and check its sha256 against edition.json.
fetch_verified() {
    want=$(sha_of "$1") || exit
    mkdir -p "$TMP/${1%/*}"
    fetch_or_fail "$URL/$BPATH/$1" "$TMP/$1"
    got=$(sha256sum "$TMP/$1" | awk '{ print $1 }')
    [ "$got" = "$want" ] || fail 2 "$1: sha256 $got, but edition.json says $want (nothing changed)"
}

# ---- settings --------------------------------------------------------------------------------------------
SETTINGS_NAMES='make\.conf|make\.profile|(repos|binrepos)\.conf/(snapshotter\.conf)?|package\.[a-z._]+/(snapshotter)?|env/([A-Za-z0-9._+-]+/?)*'

unpack_settings() {
    list=$TMP/settings.list
    xz -dc "$TMP/$SETTINGS" | tar -tf - >"$list" 2>/dev/null || fail 2 "$SETTINGS: not a readable .tar.xz"
    while IFS= read -r name; do
        matches "$name" "$SETTINGS_NAMES" || fail 2 "$SETTINGS holds an unexpected member '$name' (nothing changed)"
        case /$name/ in */../* | */./*) fail 2 "$SETTINGS holds an unexpected member '$name' (nothing changed)" ;; esac
    done <"$list"
    mkdir "$TMP/settings" || fail 1 "cannot create $TMP/settings"
    xz -dc "$TMP/$SETTINGS" | (cd "$TMP/settings" && tar -xf -) || fail 2 "$SETTINGS: cannot unpack"
    if [ -e "$TMP/settings/make.profile" ] || [ -L "$TMP/settings/make.profile" ]; then
        [ -L "$TMP/settings/make.profile" ] || fail 2 "$SETTINGS: make.profile is not a symlink"
        target=$(readlink "$TMP/settings/make.profile")
        # ../../var/db/repos/REPO/profiles/A/B: no component may start with a dot below ../../
        matches "$target" '\.\./\.\./var/db/repos/[A-Za-z0-9_-]+/profiles(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+' \
            || fail 2 "$SETTINGS: make.profile points at $target"
        if [ -d "$ETC/make.profile" ] && [ ! -L "$ETC/make.profile" ]; then
            fail 1 "$ETC/make.profile is a directory: the build's settings need a symlink there"
        fi
    fi
    (cd "$TMP/settings" && find . -type f | sed 's|^\./||' | sort) >"$TMP/settings.files"
    grep -qx make.conf "$TMP/settings.files" || fail 2 "$SETTINGS has no make.conf"
    # Everything that will be replaced must be a file (or missing), and its directory a directory.
    while IFS= read -r rel; do
        [ ! -d "$ETC/$rel" ] || fail 1 "$ETC/$rel is a directory: the build's settings need a file there"
        dir=${rel%/*}
        if [ "$dir" != "$rel" ] && { [ -e "$ETC/$dir" ] || [ -L "$ETC/$dir" ]; } && [ ! -d "$ETC/$dir" ]; then
            # A regular file package.X (or repos.conf, binrepos.conf) becomes X/local; anything else stops here.
            case $dir in
                env) fail 1 "$ETC/env is not a directory" ;;
            esac
            [ -f "$ETC/$dir" ] && [ ! -L "$ETC/$dir" ] \
                || fail 1 "$ETC/$dir is neither a directory nor a file (a symlink?): the build's settings need a directory there"
        fi
    done <"$TMP/settings.files"
}

# put FILE REL: install FILE as $ETC/REL (a new file renamed over the old one).
put() {
    new=$ETC/$2.snapshotter-new
    rm -f "$new"
    cat "$1" >"$new" && chmod 0644 "$new" && mv -f "$new" "$ETC/$2" || fail 1 "cannot write $ETC/$2"
}

install_settings() {
    mkdir -p "$ETC" || fail 1 "cannot create $ETC"
    if [ -f "$ETC/make.conf" ] && [ ! -e "$ETC/make.conf.before-snapshotter" ] \
        && ! head -n 1 "$ETC/make.conf" | grep -qF "$MARK"; then
        cp -p "$ETC/make.conf" "$ETC/make.conf.before-snapshotter" || fail 1 "cannot keep $ETC/make.conf"
        say "kept this host's make.conf as $ETC/make.conf.before-snapshotter (its own settings go into make.conf.local)"
    fi
    count=0
    while IFS= read -r rel; do
        dir=${rel%/*}
        if [ "$dir" != "$rel" ]; then
            if [ -f "$ETC/$dir" ] && [ ! -L "$ETC/$dir" ]; then
                # A single file (e.g. package.use) becomes a directory: the file keeps its content as X/local.
                mv "$ETC/$dir" "$ETC/$dir.snapshotter-tmp" && mkdir "$ETC/$dir" \
                    && mv "$ETC/$dir.snapshotter-tmp" "$ETC/$dir/local" || fail 1 "cannot turn $ETC/$dir into a directory"
                say "moved $ETC/$dir (a file) to $ETC/$dir/local"
            fi
            mkdir -p "$ETC/$dir" || fail 1 "cannot create $ETC/$dir"
        fi
        if [ "$rel" = binrepos.conf/snapshotter.conf ]; then
            # The tarball says @SNAPSHOTTER_URL@ where the edition's URL goes (the same tarball serves every client).
            while IFS= read -r line || [ -n "$line" ]; do
                while :; do
                    case $line in
                        *@SNAPSHOTTER_URL@*) line=${line%%@SNAPSHOTTER_URL@*}$URL${line#*@SNAPSHOTTER_URL@} ;;
                        *) break ;;
                    esac
                done
                printf '%s\n' "$line"
            done <"$TMP/settings/$rel" >"$TMP/binrepos.conf"
            put "$TMP/binrepos.conf" "$rel"
        else
            put "$TMP/settings/$rel" "$rel"
        fi
        count=$((count + 1))
    done <"$TMP/settings.files"
    if [ -L "$TMP/settings/make.profile" ]; then
        # Not mv: onto a symlink to a directory (the old profile), mv would move the new link into it.
        rm -f "$ETC/make.profile" && ln -s "$(readlink "$TMP/settings/make.profile")" "$ETC/make.profile" \
            || fail 1 "cannot point $ETC/make.profile at the build's profile"
    fi
    # What the previous build installed and this one does not: removed (and every package.*/snapshotter).
    removed=0
    {
        [ ! -f "$STATE/settings.files" ] || cat "$STATE/settings.files"
        for f in "$ETC"/package.*/snapshotter; do
            [ ! -f "$f" ] || printf '%s\n' "${f#"$ETC"/}"
        done
    } | sort -u >"$TMP/old.files"
    while IFS= read -r rel; do
        matches "$rel" "$SETTINGS_NAMES" || continue
        case /$rel/ in */../*) continue ;; esac
        if ! grep -qxF "$rel" "$TMP/settings.files" && [ -f "$ETC/$rel" ]; then
            rm -f "$ETC/$rel" && removed=$((removed + 1))
        fi
    done <"$TMP/old.files"
    [ -e "$ETC/make.conf.local" ] || : >"$ETC/make.conf.local" || fail 1 "cannot create $ETC/make.conf.local"
    cp "$TMP/settings.files" "$STATE/settings.files.new" && mv -f "$STATE/settings.files.new" "$STATE/settings.files" \
        || fail 1 "cannot write $STATE/settings.files"
    say "installed the settings of build $BUILD into $ETC ($count files, $removed removed; this host's own: make.conf.local)"
}

# ---- the update ------------------------------------------------------------------------------------------
log_tail() {
    tail -n 15 "$LOG" | sed "s/^/$PROG: | /" >&2
}

run_webrsync() {
    mkdir -p "$TMP/distdir" && mv "$TMP/snapshots/"* "$TMP/distdir/" || fail 1 "cannot prepare $TMP/distdir"
    say "emerge-webrsync --revert=$DAY: the tree of tag $TAG (log: $LOG)"
    fetchcommand='' resumecommand=''
    if [ -n "$CERT" ]; then
        fetchcommand="wget --tries=$TRIES --timeout=$TIMEOUT $TLS -O \"\${DISTDIR}/\${FILE}\" \"\${URI}\""
        resumecommand="wget -c --tries=$TRIES --timeout=$TIMEOUT $TLS -O \"\${DISTDIR}/\${FILE}\" \"\${URI}\""
    fi
    # The snapshot is already here and verified: --keep makes emerge-webrsync take it from DISTDIR (it
    # checks md5 and signature again, with a keyring holding only SIGNING_KEY, ultimately trusted: gpg, not
    # gemato, which would want to refresh the key from a keyserver; PORTAGE_GPG_KEY need only exist then).
    {
        printf '==== %s: emerge-webrsync --revert=%s (build %s)\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$DAY" "$BUILD"
        if [ -n "$fetchcommand" ]; then
            env NOCOLOR=true GENTOO_MIRRORS="$URL/$BPATH" DISTDIR="$TMP/distdir" FEATURES=webrsync-gpg \
                PORTAGE_GPG_DIR="$TMP/gnupg" PORTAGE_GPG_KEY="$TMP/signing-key.gpg" FETCHCOMMAND="$fetchcommand" RESUMECOMMAND="$resumecommand" \
                emerge-webrsync --keep --revert="$DAY"
        else
            env NOCOLOR=true GENTOO_MIRRORS="$URL/$BPATH" DISTDIR="$TMP/distdir" FEATURES=webrsync-gpg \
                PORTAGE_GPG_DIR="$TMP/gnupg" PORTAGE_GPG_KEY="$TMP/signing-key.gpg" emerge-webrsync --keep --revert="$DAY"
        fi
    } >>"$LOG" 2>&1 </dev/null
    rc=$?
    if [ "$rc" -ne 0 ]; then
        log_tail
        fail 4 "emerge-webrsync --revert=$DAY failed (exit $rc); settings are build $BUILD's, see $LOG"
    fi
}

run_emerge() {
    say "emerge --update --deep --newuse --getbinpkg @world: the packages of build $BUILD (log: $LOG)"
    {
        printf '==== %s: emerge -uDNg @world (build %s)\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$BUILD"
        env NOCOLOR=true emerge --update --deep --newuse --getbinpkg @world
    } >>"$LOG" 2>&1 </dev/null
    rc=$?
    if [ "$rc" -ne 0 ]; then
        log_tail
        fail 5 "emerge failed (exit $rc); settings and tree are build $BUILD's, see $LOG"
    fi
}

record() {
    printf '%s\n' "$BUILD" >"$STATE/build.new" && printf '%s\n' "$PROFILE" >"$STATE/profile.new" \
        && cp "$TMP/edition.json" "$STATE/edition.json.new" \
        && mv -f "$STATE/edition.json.new" "$STATE/edition.json" \
        && mv -f "$STATE/profile.new" "$STATE/profile" && mv -f "$STATE/build.new" "$STATE/build" \
        || fail 1 "cannot record the build in $STATE"
}

main() {
    force=
    for arg in "$@"; do
        case $arg in
            --force) force=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; fail 1 "unknown argument: $arg" ;;
        esac
    done
    read_conf
    pick_fetcher
    take_lock
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    TMP=$(mktemp -d "${TMPDIR:-/var/tmp}/snapshotter-autoupdate.XXXXXX") || fail 1 "cannot create a temporary directory"
    setup_keys

    say "fetching $URL/edition.json (edition $EDITION of $PROFILE)"
    if ! fetch "$URL/edition.json" "$TMP/edition.json"; then
        if [ -n "$CERT" ] && [ "$NETWORK" = 1 ]; then
            fail 3 "$URL refused this host's certificate $CERT, or cannot be reached ($REASON)"
        fi
        fail 3 "cannot fetch $URL/edition.json ($REASON)"
    fi
    fetch_or_fail "$URL/edition.json.asc" "$TMP/edition.json.asc"
    verify "$TMP/edition.json" "$TMP/edition.json.asc" \
        || fail 2 "edition.json from $URL: signature verification failed (not signed by $SIGNING_KEY; nothing changed)"
    read_edition
    current=$(cat "$STATE/build" 2>/dev/null) || current=
    current_profile=$(cat "$STATE/profile" 2>/dev/null) || current_profile=
    if [ -z "$force" ] && [ "$current" = "$BUILD" ] && [ "$current_profile" = "$PROFILE" ]; then
        say "already at build $BUILD (tag $TAG) of $PROFILE $EDITION: nothing to do"
        exit 0
    fi
    say "verified edition.json: build $BUILD (tag $TAG); this host is at ${current:-no build}"

    SETTINGS=portage/portage_settings-$DAY.tar.xz
    say "fetching and verifying the settings $SETTINGS"
    fetch_verified "$SETTINGS"
    fetch_verified "$SETTINGS.asc"
    verify "$TMP/$SETTINGS" "$TMP/$SETTINGS.asc" \
        || fail 2 "$SETTINGS: signature verification failed (not signed by $SIGNING_KEY; nothing changed)"
    unpack_settings

    SNAPSHOT=snapshots/gentoo-$DAY.tar.xz
    say "fetching and verifying the snapshot $SNAPSHOT"
    fetch_verified "$SNAPSHOT.md5sum"
    fetch_verified "$SNAPSHOT.gpgsig"
    fetch_verified "$SNAPSHOT"
    verify "$TMP/$SNAPSHOT" "$TMP/$SNAPSHOT.gpgsig" \
        || fail 2 "$SNAPSHOT: signature verification failed (not signed by $SIGNING_KEY; nothing changed)"

    : >"$LOG" || fail 1 "cannot write $LOG"
    install_settings
    run_webrsync
    run_emerge
    record
    say "now at build $BUILD (tag $TAG) of $PROFILE $EDITION"
}

main "$@"
