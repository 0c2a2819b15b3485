# syntax=docker/dockerfile:1
# The one dlmctl image: the trainer (`torchrun ... -m dlmctl.trainer`, PyTorchJob pods), the operator
# (`python -m dlmctl.operator`, the Helm chart's Deployment) and later the service.
#   docker build -t ghcr.io/dlmctl/dlmctl:VERSION .     (VERSION: pyproject.toml's, as the chart and the spec name it)
# The torch and DeepSpeed versions below are pyproject.toml's pins (tests/test_chart.py checks they agree).
ARG PYTHON_VERSION=3.12

# ---- builder: a virtual environment with everything installed; compilers and caches stay here ----------------
FROM python:${PYTHON_VERSION}-bookworm AS builder
ARG TORCH_VERSION=2.15.0
ARG DEEPSPEED_VERSION=0.19.8
# CUDA-enabled torch wheels (they bring their CUDA runtime, cuDNN and NCCL as nvidia-* wheels; the node
# provides the driver).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dlmctl
ENV PATH=/opt/dlmctl/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# DeepSpeed's setup imports torch, hence no build isolation. No ops are compiled ahead (DS_BUILD_OPS=0) and
# none at run time: the trainer uses torch's Adam (trainer/engine.py), so the image needs no nvcc.
RUN DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
WORKDIR /src
COPY . .
RUN pip install ".[train,operator,service]" \
 && python -c "import torch, deepspeed, dlmctl.trainer, dlmctl.operator.handlers; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}' and deepspeed.__version__ == '${DEEPSPEED_VERSION}'"

# ---- runtime: Python and the environment, no build tools --------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
COPY --from=builder /opt/dlmctl /opt/dlmctl
ENV PATH=/opt/dlmctl/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/dlmctl
# The same numeric user as the chart's securityContext (runAsUser 1000): runAsNonRoot can check it.
RUN groupadd --gid 1000 dlmctl \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/dlmctl dlmctl \
 && mkdir -p /workspace/output && chown -R 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace
# Kubernetes sets the command (torchrun ... -m dlmctl.trainer, or python -m dlmctl.operator); by hand:
#   docker run IMAGE dlmctl.trainer --help      docker run IMAGE dlmctl.operator --help
ENTRYPOINT ["python", "-m"]
CMD ["dlmctl.operator"]
