# Sourced by the scripts that install a pinned Python package into a virtual environment in the
# cache (oip-client.sh, azure-server.sh), which hold their own lock while they call it.
# pip_venv FOLDER MARKER REQUIREMENT: FOLDER becomes a virtual environment with REQUIREMENT
# installed from PyPI, unless the file MARKER says that an earlier install completed; an
# interrupted install is not marked, and is done again.
pip_venv() {
  local dir="$1" marker="$2" requirement="$3"
  [ -f "$marker" ] && return 0
  rm -rf "$dir"
  echo "installing $requirement from PyPI" >&2
  python3 -m venv "$dir" >&2
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$requirement" >&2
  touch "$marker"
}
