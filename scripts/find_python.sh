# Sourced by the scripts: `find_python 3.11` (or `find_python 3.12 3.13`) prints the path of an
# interpreter of one of those versions: $PYTHON if set, else pythonX.Y on PATH, else pyenv's.
find_python() {
  local version candidates=("${PYTHON:-}") pyenv_root
  pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for version in "$@"; do candidates+=("python$version"); done
  [ "$1" = 3.11 ] && candidates+=(python3)
  for version in "$@"; do candidates+=("$pyenv_root"/versions/"$version".*/bin/python3); done
  for candidate in "${candidates[@]}"; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(f"{sys.version_info[0]}.{sys.version_info[1]}" not in sys.argv[1:])' "$@" 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
