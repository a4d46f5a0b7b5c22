# Helpers for the install scripts (sourced): a virtual environment marked fresh by a stamp file
# holding a digest of what built it, and a quiet pip.

# fresh VENV KEY: true when VENV was last built from KEY.
fresh() { [ -f "$1/.trillora-installed" ] && [ "$(cat "$1/.trillora-installed")" = "$2" ]; }

# mark_fresh VENV KEY: records a successful build from KEY.
mark_fresh() { echo "$2" > "$1/.trillora-installed"; }

# pip_quiet VENV ARGS...: the machine's pip configuration names index folders that may not
# exist; pip warns about each on every call. Those lines say nothing about an install, so they
# are filtered out.
pip_quiet() {
    local venv=$1
    shift
    "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
