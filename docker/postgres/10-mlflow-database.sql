-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), after it has
-- created the POSTGRES_DB database (prefect) for POSTGRES_USER: MLflow's tracking store beside it.
CREATE DATABASE mlflow;
