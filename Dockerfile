# mct-ray on the official Ray GPU image.
#
# The Ray version is pinned once, in pyproject.toml (`ray[default]==X`); RAY_VERSION below and
# the image tags in cluster/ must equal it (tests/test_version_pins.py checks). Python 3.11 is
# the version the project is developed and tested on. CUDA: the PyPI torch wheels for Linux
# are CUDA 13 builds that bring their own CUDA runtime libraries, so the base image only has
# to be a CUDA 13 one (Ray's cu130 images) and the host needs an NVIDIA driver >= 580.
#
#   docker build -t mct-ray:0.1.0-ray2.60.0-py311-cu130 .
#   docker run --gpus all --rm mct-ray:0.1.0-ray2.60.0-py311-cu130 mct-ray run --recipe digits
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu130
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}

ARG RAY_VERSION
WORKDIR /home/ray/mct-ray

# The package (its dependencies resolve against the Ray already in the image: same pin).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mct_ray ./mct_ray
RUN pip install --no-cache-dir . \
 && python -c "import ray, sys; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'ray {v} != pinned ${RAY_VERSION}')"

# `python -m jobs.X` entrypoints, importable from whatever directory a job's driver starts in
# (RayJob). A submitted working_dir comes first on the path and shadows this copy.
COPY --chown=ray:users jobs ./jobs
ENV PYTHONPATH=/home/ray/mct-ray \
    PYTHONUNBUFFERED=1
