#!/bin/sh
# The project's own environment in a worker's fresh checkout: .venv (prefect.yaml's pull step).
# The flow runs every stage with .venv/bin/python (defectforge.orchestrate.project_python).
#   default:                 `make install` builds .venv from requirements.txt (minutes, about 6.5 GB)
#   DEFECTFORGE_VENV=DIR:    link a prebuilt venv of the same requirements instead (seconds);
#                            the checkout's own src/ still wins (PYTHONPATH of every stage)
set -eu
if [ -n "${DEFECTFORGE_VENV:-}" ]; then
    if [ ! -x "$DEFECTFORGE_VENV/bin/python" ]; then
        echo "error: DEFECTFORGE_VENV=$DEFECTFORGE_VENV: no bin/python there" >&2
        exit 2
    fi
    if [ -e .venv ] && [ ! -L .venv ]; then
        echo "error: $(pwd)/.venv exists and is not a link: not replacing it" >&2
        exit 2
    fi
    ln -sfn "$DEFECTFORGE_VENV" .venv
    echo "project environment: .venv -> $DEFECTFORGE_VENV"
else
    make install
    echo "project environment: $(pwd)/.venv (make install)"
fi
