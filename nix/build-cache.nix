# Build-directory cache for a Nix derivation, through the local p2pcache node's HTTP API.
#
#   buildCache = import ./nix/build-cache.nix { netrcFile = "/var/lib/p2pcache/api.netrc"; };
#                                                               # node ? "http://127.0.0.1:37515"
#   pkg = buildCache { key = "main/foo-${rev}"; fallbackKey = "main/foo-"; cacheDirs = [ "build" ]; }
#           (stdenv.mkDerivation { ... });                      # or a plain attribute set of mkDerivation
#
# Before configure (preConfigure) it asks the node for `key`, else the newest key starting with
# `fallbackKey`, and unpacks that tree (a tar stream the node makes from its repo) into the build
# directory; then every source under `sourceDir` is made newer than every restored file, except the
# sources whose sha256 equals the one recorded at save time, which are made older — so make rebuilds
# exactly what changed (sources joined by path *and* hash; deleted sources are reported). Before install
# (preInstall) it sends `cacheDirs` and the (sha256, path) list of the sources to the node as a tar stream,
# saved under `key` (keys are immutable: a key that exists is left as it is). The node signs the key
# record with its identity and shares it with the swarm; which keys it may write is the team's
# `[buildcache] writers` policy.
#
# Limit (as in nix-build-cache): the builder must reach the node, so the build needs network access to
# 127.0.0.1: `sandbox = false` (or a relaxed sandbox for these derivations). A miss or an unreachable node
# never fails the build; it just builds from scratch. The cache makes the output depend on more than the
# inputs only in mtimes and in which objects are rebuilt, so use it for builds whose outputs do not
# embed build-directory timestamps.
{ node ? "http://127.0.0.1:37515", netrcFile ? null }:
{ key, fallbackKey ? null, cacheDirs ? [ "build" ], sourceDir ? ".", force ? false, toolPath ? "" }:
drv:
let
  # The node's API wants its token: REPO/api.netrc (a string path, read at build time; it changes with
  # every daemon start, so never copy it into the store).
  curl = if netrcFile == null then "curl" else "curl --netrc-file ${netrcFile}";
  q = builtins.replaceStrings [ "%" "&" "=" "+" " " "#" "?" ] [ "%25" "%26" "%3D" "%2B" "%20" "%23" "%3F" ];
  dirs = builtins.concatStringsSep " " cacheDirs;
  pathArgs = builtins.concatStringsSep "" (map (d: "&path=${q d}") cacheDirs);
  restoreArgs = if fallbackKey == null then "" else "&restore_key=${q fallbackKey}";
  prune = builtins.concatStringsSep " " (map (d: "-path ./${d} -prune -o") cacheDirs);
  restore = ''
    (
      ${if toolPath == "" then "" else "PATH=${toolPath}:$PATH"}
      meta="$PWD/.p2pcache-build-cache"
      tarball="''${TMPDIR:-/tmp}/p2pcache-restore.tar"
      if ${curl} -sSf -o "$tarball" -D "$tarball.headers" "${node}/api/v0/cache/tar?key=${q key}${restoreArgs}"; then
        tar -xf "$tarball"
        echo "p2pcache build cache: restored $(grep -i '^x-p2pcache-key:' "$tarball.headers" | tr -d '\r' | cut -d' ' -f2-) ($(grep -i '^x-p2pcache-match:' "$tarball.headers" | tr -d '\r' | cut -d' ' -f2))"
        oldest=$(find ${dirs} -type f -printf '%T@\n' 2>/dev/null | sort -n | head -n 1)
        oldest=''${oldest%.*}
        # every source newer than the restored files, then the unchanged ones older than all of them
        (cd ${sourceDir} && find . ${prune} -path ./.p2pcache-build-cache -prune -o -type f -print0 | xargs -0r touch)
        if [ -n "$oldest" ] && [ -f "$meta/sources" ]; then
          (cd ${sourceDir} && sha256sum -c "$meta/sources" 2>/dev/null || true) \
            | sed -n 's/: OK$//p' | while IFS= read -r f; do touch -h -d "@$((oldest - 1))" "${sourceDir}/$f"; done
          gone=$(cd ${sourceDir} && cut -c67- "$meta/sources" | while IFS= read -r f; do [ -e "$f" ] || echo "$f"; done)
          [ -z "$gone" ] || echo "p2pcache build cache: sources deleted since the save: $gone"
        fi
        rm -rf "$meta"
      else
        echo "p2pcache build cache: no entry for ${key} (or the node at ${node} is unreachable); building from scratch"
      fi
      rm -f "$tarball" "$tarball.headers"
    )
  '';
  save = ''
    (
      ${if toolPath == "" then "" else "PATH=${toolPath}:$PATH"}
      meta="$PWD/.p2pcache-build-cache"
      mkdir -p "$meta"
      (cd ${sourceDir} && find . ${prune} -path ./.p2pcache-build-cache -prune -o -type f -print0 | sort -z \
        | xargs -0r sha256sum) > "$meta/sources"
      if tar --format=posix -cf - ${dirs} .p2pcache-build-cache \
          | ${curl} -sSf -X POST --data-binary @- -H 'content-type: application/x-tar' \
              "${node}/api/v0/cache/tar?key=${q key}${pathArgs}${if force then "&force=1" else ""}"; then
        echo
      else
        echo "p2pcache build cache: saving ${key} to ${node} failed; the build goes on"
      fi
      rm -rf "$meta"
    )
  '';
  hook = old: {
    preConfigure = restore + (old.preConfigure or "");
    preInstall = (old.preInstall or "") + save;
  };
in
if drv ? overrideAttrs then drv.overrideAttrs hook else drv // hook drv
