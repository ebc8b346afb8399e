# wadi on the official PyTorch CUDA runtime image.
#   docker build -t wadi .
#   docker run --gpus all -v $HOME/.cache/huggingface:/root/.cache/huggingface -v $PWD:/work wadi \
#       sample "a shiba inu wearing a beret" --backbone sd21 --prompts captions.txt --out /work/samples
# The image's torch must meet every dependency's floor (pyproject: torch>=2.4; accelerate
# and transformers today: torch>=2.6), else pip would replace it with a CPU/CUDA build of its
# own choosing. TORCH_VERSION is the base image's torch; the install pins it, so a dependency
# that needs a newer torch fails the build instead of swapping torch silently.
# tests/test_docker.py parses this file and checks both against the installed dependencies.
ARG TORCH_VERSION=2.7.1
ARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG TORCH_VERSION

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/wadi
COPY pyproject.toml README.md ./
COPY wadi_cli ./wadi_cli
# baselines = peft (LoRA/DoRA students), tensorboard = training logs, 8bit = bitsandbytes AdamW8bit
RUN pip install ".[baselines,tensorboard,8bit]" "torch==${TORCH_VERSION}" \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" \
    && wadi --version

WORKDIR /work
ENTRYPOINT ["wadi"]
CMD ["--help"]
