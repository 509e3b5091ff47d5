# Source on the GPU machine from the repository root: installs the carried bitsandbytes wheel into /tmp/site and
# builds an import root /tmp/qroot/qaas (qaas/* + kernels + worker + api as symlinks), since the editable install
# does not work there.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
R=$(pwd)
mkdir -p /tmp/qroot/qaas
for f in "$R"/qaas/*; do ln -sfn "$f" /tmp/qroot/qaas/; done
ln -sfn "$R/kernels" /tmp/qroot/qaas/kernels
ln -sfn "$R/worker" /tmp/qroot/qaas/worker
ln -sfn "$R/api" /tmp/qroot/qaas/api
export PYTHONPATH=/tmp/qroot:/tmp/site
export PYTHONUNBUFFERED=1
