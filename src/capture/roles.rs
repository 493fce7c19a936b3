//! meridian's two roles, when `backend.owner` is set (README "Roles"):
//! the owner owns schema `meridian` and the publication and runs
//! `meridian migrate`; `backend.user` reads the change stream, records it,
//! ships it and applies peers' changes. Neither is a superuser.
//!
//! Postgres 15 still keeps a few things to superusers, needed once per
//! region: making a role with REPLICATION, granting SET on
//! `session_replication_role` and EXECUTE on the replication-origin
//! functions, and creating event triggers. `meridian migrate --as
//! SUPERUSER` does those ([`create`]) and runs every other step as the
//! owner (`SET ROLE`), so everything meridian makes belongs to the owner
//! and later runs need no superuser.

use tokio_postgres::Client;

use super::{pg, CaptureError};
use crate::config::Config;

/// The two roles, when they are two.
#[derive(Debug, Clone)]
pub struct Roles {
    pub owner: String,
    pub user: String,
}

impl Roles {
    pub fn of(config: &Config) -> Option<Roles> {
        let b = &config.backend;
        b.owner
            .as_ref()
            .filter(|o| **o != b.user)
            .map(|owner| Roles {
                owner: owner.clone(),
                user: b.user.clone(),
            })
    }
}

pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The replication-origin functions meridian's apply sessions call
/// (`meridian.apply_session_setup` and the progress reads); not
/// `pg_replication_origin_xact_setup`, which meridian does not use.
const ORIGIN_FUNCTIONS: &str =
    "pg_replication_origin_create(text), pg_replication_origin_oid(text), \
     pg_replication_origin_session_setup(text), pg_replication_origin_session_reset(), \
     pg_replication_origin_session_is_setup(), pg_replication_origin_session_progress(boolean), \
     pg_replication_origin_progress(text, boolean)";

/// As a superuser: the two roles (made if missing), and every grant only a
/// superuser may give. Refuses replicated tables a superuser owns: the
/// owner role could not install capture on them.
pub async fn create(client: &Client, roles: &Roles, config: &Config) -> Result<(), CaptureError> {
    let schemas = &config.replication.schemas;
    let superuser_owned: Vec<String> = client
        .query(
            "SELECT format('%I.%I (owned by %s)', n.nspname, c.relname, r.rolname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_roles r ON r.oid = c.relowner
              WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND r.rolsuper
              ORDER BY 1",
            &[schemas],
        )
        .await
        .map_err(pg("listing replicated tables' owners"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !superuser_owned.is_empty() {
        return Err(CaptureError::Settings(format!(
            "{} belong to a superuser, so meridian's owner role ({}) cannot install capture on them: give them to the application's own role (ALTER TABLE ... OWNER TO ...) and run migrate again",
            superuser_owned.join(", "),
            roles.owner
        )));
    }
    let owners: Vec<String> = client
        .query(
            "SELECT DISTINCT r.rolname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_roles r ON r.oid = c.relowner
              WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'S') AND NOT r.rolsuper
             UNION
             SELECT r.rolname FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
              WHERE n.nspname = ANY($1) AND NOT r.rolsuper AND r.rolname <> 'pg_database_owner'",
            &[schemas],
        )
        .await
        .map_err(pg("listing replicated tables' owners"))?
        .iter()
        .map(|r| r.get(0))
        .filter(|o: &String| *o != roles.owner && *o != roles.user)
        .collect();
    let (owner, user) = (ident(&roles.owner), ident(&roles.user));
    // One transaction, holding a lock on the shared role catalog: regions
    // of one cluster migrated at once (tests do) otherwise meet on the same
    // catalog rows ("tuple concurrently updated").
    let mut sql = format!(
        "BEGIN;
         LOCK TABLE pg_catalog.pg_authid IN EXCLUSIVE MODE;
         DO $$BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {o}) THEN CREATE ROLE {owner} LOGIN; END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {u}) THEN CREATE ROLE {user} LOGIN; END IF;
         END$$;
         ALTER ROLE {owner} NOSUPERUSER REPLICATION;
         ALTER ROLE {user} NOSUPERUSER REPLICATION;
         GRANT CREATE ON DATABASE {db} TO {owner};
         GRANT {user} TO {owner};
         GRANT SET ON PARAMETER session_replication_role, deadlock_timeout TO {user};
         GRANT EXECUTE ON FUNCTION {ORIGIN_FUNCTIONS} TO {user};\n",
        o = quote_literal(&roles.owner),
        u = quote_literal(&roles.user),
        db = ident(&config.backend.database),
    );
    for schema in schemas {
        sql.push_str(&format!(
            "GRANT USAGE, CREATE ON SCHEMA {s} TO {owner}, {user};\n",
            s = ident(schema)
        ));
    }
    for role in &owners {
        sql.push_str(&format!("GRANT {} TO {owner}, {user};\n", ident(role)));
    }
    sql.push_str("COMMIT;");
    client.batch_execute(&sql).await.map_err(pg(
        "making meridian's roles and granting them what only a superuser may",
    ))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// As the owner, after the schema: what the apply role needs of it,
/// including functions made later (per-table capture functions).
pub async fn grant_runtime(client: &Client, roles: &Roles) -> Result<(), CaptureError> {
    let user = ident(&roles.user);
    client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA meridian TO {user};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA meridian TO {user};
             GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA meridian TO {user};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA meridian TO {user};
             ALTER DEFAULT PRIVILEGES IN SCHEMA meridian GRANT EXECUTE ON FUNCTIONS TO {user};
             ALTER DEFAULT PRIVILEGES IN SCHEMA meridian
                 GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES TO {user};"
        ))
        .await
        .map_err(pg(format!("granting {} what it needs of schema meridian", roles.user)))
}
