# Sourced by the device scripts (tools/*.sh): moa_plan importable from a repository checkout without
# building a wheel. `moa_layout REPO` makes /tmp/moa/moa_plan = REPO/moa_plan/* plus REPO's runtime/,
# search/ and evals/ as its subpackages (the install's folder mapping), and puts it on PYTHONPATH
# ahead of /tmp/site (the carried wheels). Run Python from outside REPO afterwards: the repository's
# own moa_plan/ folder, without the mapped subpackages, would shadow /tmp/moa.
moa_layout() {
  rm -rf /tmp/moa && mkdir -p /tmp/moa/moa_plan
  for f in "$1"/moa_plan/*; do ln -s "$f" /tmp/moa/moa_plan/; done
  for d in runtime search evals; do ln -s "$1/$d" "/tmp/moa/moa_plan/$d"; done
  export PYTHONPATH=/tmp/moa:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
