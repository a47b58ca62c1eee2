#!/bin/sh
# Serve REPRMERGE_BUNDLE when set (a mounted bundle); otherwise the embedded default bundle, built
# here on first start when the image was built with BUILD_BUNDLE=0. Extra arguments go to `reprmerge serve`.
set -eu
if [ -z "${REPRMERGE_BUNDLE:-}" ]; then
    REPRMERGE_BUNDLE=/opt/reprmerge/bundle
    export REPRMERGE_BUNDLE
    if [ ! -f "$REPRMERGE_BUNDLE/manifest.json" ]; then
        echo "no bundle mounted and none embedded: building the default bundle (starter suite) in $REPRMERGE_BUNDLE" >&2
        reprmerge build --suite starter --merge ties --out "$REPRMERGE_BUNDLE" --overwrite
    fi
fi
# exec: the server replaces this shell as PID 1, so SIGTERM reaches it and starts the drain.
exec reprmerge serve "$@"
