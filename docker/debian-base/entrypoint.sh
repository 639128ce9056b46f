#!/bin/bash
# The container entrypoint Spark on Kubernetes expects (the same contract as apache/spark's image):
#   driver ARGS...    spark-submit in client mode inside the driver pod, bound to the pod's address
#   executor          a KubernetesExecutorBackend JVM, configured from the SPARK_* variables the driver sets
#   anything else     run as given (spark-submit, clip-nsfw-spark, python3, bash ...)
set -eo pipefail

# OpenShift and others run images under a random uid with no passwd entry; Spark and Hadoop look the
# user up, so give that uid one through nss_wrapper.
give_uid_a_name() {
  if getent passwd "$(id -u)" > /dev/null 2>&1; then return; fi
  local library
  for library in /usr/lib/*/libnss_wrapper.so /usr/lib/libnss_wrapper.so; do
    if [ -s "$library" ]; then
      NSS_WRAPPER_PASSWD="$(mktemp)"
      NSS_WRAPPER_GROUP="$(mktemp)"
      echo "spark:x:$(id -u):$(id -g):${SPARK_USER_NAME:-anonymous uid}:${SPARK_HOME}:/bin/false" > "$NSS_WRAPPER_PASSWD"
      echo "spark:x:$(id -g):" > "$NSS_WRAPPER_GROUP"
      export LD_PRELOAD="$library" NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
      return
    fi
  done
}

# Started as root (some operators do): drop to the spark user for the Spark process itself.
as_spark() {
  if [ "$(id -u)" -eq 0 ]; then echo gosu spark; fi
}

: "${JAVA_HOME:=$(java -XshowSettings:properties -version 2>&1 | awk '/java.home/ {print $3}')}"
classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${HADOOP_CONF_DIR:+${HADOOP_CONF_DIR}:}${SPARK_CLASSPATH:+${SPARK_CLASSPATH}:}${SPARK_HOME}/jars/*${SPARK_EXTRA_CLASSPATH:+:${SPARK_EXTRA_CLASSPATH}}:${PWD}"
if [ -n "${HADOOP_HOME}" ] && [ -z "${SPARK_DIST_CLASSPATH}" ]; then
  SPARK_DIST_CLASSPATH="$("${HADOOP_HOME}/bin/hadoop" classpath)"
fi
[ -n "${PYSPARK_PYTHON+x}" ] && export PYSPARK_PYTHON
[ -n "${PYSPARK_DRIVER_PYTHON+x}" ] && export PYSPARK_DRIVER_PYTHON

case "$1" in
  driver)
    shift
    give_uid_a_name
    # shellcheck disable=SC2046  # as_spark prints nothing or two words
    exec $(as_spark) /usr/bin/tini -s -- "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client "$@"
    ;;
  executor)
    shift
    java_options=()
    for name in "${!SPARK_JAVA_OPT_@}"; do java_options+=("${!name}"); done
    give_uid_a_name
    # shellcheck disable=SC2046
    exec $(as_spark) /usr/bin/tini -s -- "${JAVA_HOME}/bin/java" "${java_options[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "${classpath}${SPARK_DIST_CLASSPATH:+:${SPARK_DIST_CLASSPATH}}" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
      --podName "${SPARK_EXECUTOR_POD_NAME}"
    ;;
  *)
    exec "$@"
    ;;
esac
