-- Run once by PostgreSQL's image when the data volume is created (docker-compose.yml mounts
-- it into /docker-entrypoint-initdb.d), as the superuser, in the `creditnotes` database.
--
-- Two login users, so that neither the migrations nor the service run as the superuser:
--   creditnotes_migrate  member of creditnotes_migrator: owns the database and its schema,
--                        applies the migrations (`creditnotes migrate`, the `migrate` job)
--   creditnotes_service  member of creditnotes_app: what `creditnotes run` may do and no more
--                        (service/adapters/sql/0003_roles.sql grants it); not the owner of
--                        anything, so it cannot alter, drop or disable a trigger
-- The group roles are created here so that migration 0003 finds them (it creates them
-- only if missing, which needs CREATEROLE). Passwords come from the compose file
-- (psql variables set by init-roles.sh).
\set ON_ERROR_STOP on

SELECT 'CREATE ROLE creditnotes_migrator NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_migrator') \gexec
SELECT 'CREATE ROLE creditnotes_app NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_app') \gexec
SELECT 'CREATE ROLE creditnotes_migrate LOGIN IN ROLE creditnotes_migrator'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_migrate') \gexec
SELECT 'CREATE ROLE creditnotes_service LOGIN IN ROLE creditnotes_app'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_service') \gexec

ALTER ROLE creditnotes_migrate PASSWORD :'migrate_password';
ALTER ROLE creditnotes_service PASSWORD :'service_password';
SELECT format('ALTER DATABASE %I OWNER TO creditnotes_migrate', current_database()) \gexec
ALTER SCHEMA public OWNER TO creditnotes_migrate;
