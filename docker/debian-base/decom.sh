#!/bin/bash
# Spark on Kubernetes runs this in an executor pod's preStop hook when spark.decommission.enabled is set:
# tell the executor JVM (SIGPWR) to hand its blocks and tasks over, then wait until it has exited.
set -uo pipefail
executor="$(pgrep -f KubernetesExecutorBackend | head -1)"
if [ -z "$executor" ]; then
  echo "decom.sh: no executor process" >&2
  exit 0
fi
echo "decom.sh: asking executor ${executor} to decommission"
kill -s PWR "$executor"
while kill -0 "$executor" 2> /dev/null; do sleep 1; done
echo "decom.sh: executor ${executor} has exited"
