//! The fleet's state in PostgreSQL (`fleet serve --database postgres://…`), for replicas that
//! share it: every replica then answers the whole API.
//!
//! - **Schema**: versioned migrations in `runtime/fleet/migrations/`, applied at start in one
//!   transaction under an advisory lock (replicas starting together do not race); a database
//!   migrated by a newer fleet is refused by name.
//! - **Telemetry and events**: records in tables partitioned by the UTC day the fleet received
//!   them, so retention drops whole partitions; exactly-once storage per (device, seq) by the
//!   primary key of a key table beside them (a primary key on a partitioned table must hold the
//!   partition's column, so it could not stop a record received twice on two days).
//! - **Bundle files** stay content-addressed files in a directory (`<data-dir>/artifacts`, on
//!   storage the replicas share): devices download them over HTTP by digest, a file is written
//!   once under a temporary name and renamed, and a digest names the same bytes everywhere, so
//!   replicas need no coordination over them, and the database holds no large values.
//! - **Blocking calls**: the store's trait is blocking (sled's is), so each call runs the
//!   driver's future on the calling thread, its connections driven by a small runtime of the
//!   store's own. A call costs its round trips to the database, as a sled call costs its
//!   disk; the fleet already runs the long ones on blocking threads.
//!
//! When the database is unreachable every call fails with [`FleetError::Database`] (the API
//! answers 503, ingestion stops acknowledging) and the pool connects again by itself.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use outpost_proto::{DeviceId, TelemetryRecord};
use sha2::Digest;

use crate::store_pg_tls::{DatabaseTls, RustlsConnect};
use tokio_postgres::types::Json;

use crate::error::{FleetError, Result};
use crate::store::{
    BundleRecord, Credential, DeploymentRecord, DesiredRecord, DeviceRecord, FleetStore, Leader,
    MAX_VARIANTS, Put, StoredRecord, Stream, artifact_path_in, decode, encode, now_secs,
    write_artifact,
};

/// The schema's migrations, in order: (version, SQL).
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (2, include_str!("../migrations/0002_publishing_role.sql")),
    (3, include_str!("../migrations/0003_flush.sql")),
    (4, include_str!("../migrations/0004_leader_api.sql")),
];

/// The advisory lock migrations are applied under.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;
/// The advisory lock retention runs under (one replica prunes at a time).
const PRUNE_LOCK: i64 = 0x6f75_7470_6f73_7402;
/// The session advisory lock of the publishing role.
const ROLE_LOCK: i64 = 0x6f75_7470_6f73_7403;
/// The transaction advisory lock every desired-state write takes: they happen one at a time
/// across the replicas, as under the embedded store's write lock (a desired state not stored
/// yet has no row to lock).
const DESIRED_LOCK: i64 = 0x6f75_7470_6f73_7404;
/// How soon the publishing role's connection notices a database gone silent (TCP keepalive).
const ROLE_KEEPALIVE: Duration = Duration::from_secs(5);

/// Seconds in a partition.
const DAY: u64 = 86_400;
/// Devices read per round trip by [`FleetStore::devices_after`].
const DEVICE_PAGE: i64 = 256;
/// Connections per replica.
const POOL_SIZE: usize = 8;
/// How long a call waits for a connection, or to make one.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A driver or pool error, with its causes (the driver's "error performing TLS handshake"
/// says why only in its source).
fn db(e: impl std::error::Error) -> FleetError {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    FleetError::Database(message)
}

/// u64 to bigint (saturating: every stored value fits in practice).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unbig(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn tables(stream: Stream) -> (&'static str, &'static str) {
    match stream {
        Stream::Telemetry => ("telemetry", "telemetry_keys"),
        Stream::Events => ("events", "events_keys"),
    }
}

/// The connection units of writes ([`FleetStore::unit`]) run on: its own, not the pool's,
/// with `synchronous_commit` off for the session, driven by a single-threaded runtime of its
/// own on the thread that runs the unit. A round trip is then the database's alone, with no
/// hand-over to the store's runtime thread and back (two thread wake-ups a statement, most of
/// a statement's cost on a busy machine).
struct UnitConnection {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    statements: RefCell<HashMap<String, tokio_postgres::Statement>>,
}

/// What a statement in a unit sees: the unit connection's client, with a statement cache.
struct UnitClient<'a>(&'a UnitConnection);

impl std::ops::Deref for UnitClient<'_> {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        &self.0.client
    }
}

impl UnitClient<'_> {
    /// Like the pool's `prepare_cached`.
    async fn prepare_cached(
        &self,
        sql: &str,
    ) -> std::result::Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(statement) = self.0.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.0.client.prepare(sql).await?;
        self.0
            .statements
            .borrow_mut()
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// A unit open on a thread: its connection, inside a transaction, and whether a statement in
/// it failed.
struct Unit {
    /// The address of the store it belongs to.
    store: usize,
    connection: UnitConnection,
    failed: bool,
    /// Device records the unit holds the row lock of, as the unit left them: read again and
    /// written by the unit only, until it ends.
    devices: HashMap<String, DeviceRecord>,
}

thread_local! {
    /// The unit open on this thread, if any. A store call on this thread while it is open
    /// runs its statements in the unit's transaction rather than in one of its own.
    static UNIT: RefCell<Option<Unit>> = const { RefCell::new(None) };
}

/// Takes this thread's unit out when it ends, by [`OpenUnit::close`] or by a panic (its
/// connection, inside a transaction, is then dropped).
struct OpenUnit(usize);

impl OpenUnit {
    fn close(self) -> Option<Unit> {
        let unit = UNIT.with(|unit| {
            let mut unit = unit.borrow_mut();
            if unit.as_ref().is_some_and(|u| u.store == self.0) {
                unit.take()
            } else {
                None
            }
        });
        std::mem::forget(self);
        unit
    }
}

impl Drop for OpenUnit {
    fn drop(&mut self) {
        let store = self.0;
        let _ = UNIT.try_with(|unit| {
            let mut unit = unit.borrow_mut();
            if unit.as_ref().is_some_and(|u| u.store == store) {
                unit.take();
            }
        });
    }
}

/// Runs `$body`, an async block whose statements go to `$c`, on this thread's unit (its
/// connection and runtime) when one is open: `Some` of its result, else `None`.
macro_rules! on_unit {
    ($store:expr, |$c:ident| $body:expr) => {
        $store.in_unit(|unit| {
            unit.connection.runtime.block_on(async {
                let $c = &UnitClient(&unit.connection);
                $body.await
            })
        })
    };
}

/// Runs `$body` on this thread's unit when one is open, else in a transaction of its own on
/// a pooled connection, committed at the end.
macro_rules! in_transaction {
    ($store:expr, |$c:ident| $body:expr) => {{
        match on_unit!($store, |$c| $body) {
            Some(out) => out,
            None => $store.block(async {
                let mut client = $store.client().await?;
                let tx = client.transaction().await.map_err(db)?;
                let out: Result<_> = {
                    let $c = &tx;
                    $body.await
                };
                let out = out?;
                tx.commit().await.map_err(db)?;
                Ok(out)
            }),
        }
    }};
}

/// A device's record in a unit: under its row lock, taken on the first read.
fn device_in(unit: &mut Unit, id: &str) -> Result<Option<DeviceRecord>> {
    if let Some(record) = unit.devices.get(id) {
        return Ok(Some(record.clone()));
    }
    let connection = &unit.connection;
    let record = connection.runtime.block_on(async {
        let c = UnitClient(connection);
        let select = c
            .prepare_cached("SELECT doc FROM devices WHERE id = $1 FOR UPDATE")
            .await
            .map_err(db)?;
        c.query_opt(&select, &[&id])
            .await
            .map_err(db)?
            .map(|row| {
                row.try_get::<_, Json<DeviceRecord>>(0)
                    .map(|j| j.0)
                    .map_err(db)
            })
            .transpose()
    })?;
    if let Some(record) = &record {
        unit.devices.insert(id.to_owned(), record.clone());
    }
    Ok(record)
}

/// [`PgStore::change_device`] in a unit: the record read once (or made), written at each
/// change.
fn change_device_in(
    unit: &mut Unit,
    id: &str,
    create: bool,
    change: &mut dyn FnMut(&mut DeviceRecord),
) -> Result<Option<DeviceRecord>> {
    let mut record = device_in(unit, id)?;
    let connection = &unit.connection;
    if record.is_none() && create {
        record = connection.runtime.block_on(async {
            let c = UnitClient(connection);
            let insert = c
                .prepare_cached(
                    "INSERT INTO devices (id, doc) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET doc = devices.doc RETURNING doc",
                )
                .await
                .map_err(db)?;
            let row = c
                .query_one(&insert, &[&id, &Json(new_device(id))])
                .await
                .map_err(db)?;
            Ok::<_, FleetError>(Some(row.try_get::<_, Json<DeviceRecord>>(0).map_err(db)?.0))
        })?;
    }
    let Some(mut record) = record else {
        return Ok(None);
    };
    change(&mut record);
    connection.runtime.block_on(async {
        let c = UnitClient(connection);
        let update = c
            .prepare_cached("UPDATE devices SET doc = $2 WHERE id = $1")
            .await
            .map_err(db)?;
        c.execute(&update, &[&id, &Json(&record)]).await.map_err(db)
    })?;
    unit.devices.insert(id.to_owned(), record.clone());
    Ok(Some(record))
}

/// Wakes the thread that blocks on a future.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    /// Drives the pool's connections (taken out on drop: a runtime must not be dropped on an
    /// async thread).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    artifacts: PathBuf,
    shown: String,
    /// Day partitions known to exist (or that could not be made), by (table, day).
    partitions: Mutex<HashSet<(&'static str, u64)>>,
    /// Where to connect the publishing role's own connection.
    config: tokio_postgres::Config,
    /// TLS to the database, when its URL asks for it.
    tls: RustlsConnect,
    /// The connection holding the publishing role's lock, while this process holds it.
    role: Mutex<Option<tokio_postgres::Client>>,
    /// The role's epoch this process took (0: it does not hold the role).
    epoch: std::sync::atomic::AtomicI64,
    /// This process's row in `outpost_flush`.
    flush_id: i64,
    /// Whether a unit committed without waiting for the disk since the last flush.
    unflushed: std::sync::atomic::AtomicBool,
    /// The connection units run on, between units (made on the first).
    unit_connection: Mutex<Option<UnitConnection>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.shown)
            .field("artifacts", &self.artifacts)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Runtimes must not be dropped on an async thread, where a store may well be.
        if let Ok(mut slot) = self.unit_connection.lock()
            && let Some(UnitConnection {
                runtime, client, ..
            }) = slot.take()
        {
            drop(client);
            runtime.shutdown_background();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Where `url` points, without its password.
fn shown(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
            tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
        })
        .collect();
    format!(
        "postgres at {}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq key=value string),
    /// applies the migrations it lacks, and keeps bundle files in `artifacts`.
    pub fn connect(url: &str, artifacts: &Path) -> Result<Self> {
        let tls = DatabaseTls::parse(url);
        let connector = tls.connector()?;
        let mut config: tokio_postgres::Config = tls
            .url
            .parse()
            .map_err(|e| FleetError::Config(format!("the database URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("outpost-fleet");
        }
        if config.get_options().is_none() {
            // Not a notice per `CREATE … IF NOT EXISTS` in the fleet's log.
            config.options("-c client_min_messages=warning");
        }
        if !tls.wanted {
            // The driver's default is `prefer`; without `sslmode` the connection stays plain.
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        let mut shown = shown(&config);
        if tls.wanted {
            shown.push_str(" (TLS)");
        }
        std::fs::create_dir_all(artifacts)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("outpost-pg")
            .enable_all()
            .build()?;
        let manager = Manager::from_config(
            config.clone(),
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| FleetError::Config(format!("the database pool: {e}")))?;
        let store = Self {
            runtime: Some(runtime),
            pool,
            artifacts: artifacts.to_owned(),
            shown,
            partitions: Mutex::new(HashSet::new()),
            config,
            tls: connector,
            role: Mutex::new(None),
            epoch: std::sync::atomic::AtomicI64::new(0),
            flush_id: 0,
            unflushed: std::sync::atomic::AtomicBool::new(false),
            unit_connection: Mutex::new(None),
        };
        let mut store = store;
        let named = store.shown.clone();
        let unusable = move |e| match e {
            FleetError::Database(e) => FleetError::Config(format!("cannot use the {named}: {e}")),
            other => other,
        };
        store.migrate().map_err(&unusable)?;
        store.flush_id = big(store.block(store.next_id()).map_err(&unusable)?);
        // Rows of processes gone a week: one a process, so they are few anyway.
        let week_ago = big(now_secs().saturating_sub(7 * DAY));
        store
            .block(store.execute("DELETE FROM outpost_flush WHERE at < $1", &[&week_ago]))
            .map_err(unusable)?;
        let today = now_secs() / DAY;
        for stream in [Stream::Telemetry, Stream::Events] {
            store.ensure_partition(tables(stream).0, today);
            store.ensure_partition(tables(stream).0, today + 1);
        }
        Ok(store)
    }

    /// Runs `future` to its end on this thread, its I/O driven by the store's runtime.
    fn block<F: Future>(&self, future: F) -> F::Output {
        let _entered = self.runtime.as_ref().map(|r| r.enter());
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(db)
    }

    fn migrate(&self) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS outpost_migrations \
                 (version integer PRIMARY KEY, applied_at bigint NOT NULL)",
            )
            .await
            .map_err(db)?;
            let applied: HashSet<i32> = tx
                .query("SELECT version FROM outpost_migrations", &[])
                .await
                .map_err(db)?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<std::result::Result<_, _>>()
                .map_err(db)?;
            let known = MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0);
            if let Some(newer) = applied.iter().copied().filter(|v| *v > known).max() {
                return Err(FleetError::Config(format!(
                    "the {} has schema version {newer}, from a newer fleet; this fleet knows \
                     versions up to {known}",
                    self.shown
                )));
            }
            for (version, sql) in MIGRATIONS {
                if applied.contains(version) {
                    continue;
                }
                tx.batch_execute(sql)
                    .await
                    .map_err(|e| FleetError::Database(format!("migration {version}: {e}")))?;
                tx.execute(
                    "INSERT INTO outpost_migrations (version, applied_at) VALUES ($1, $2)",
                    &[version, &big(now_secs())],
                )
                .await
                .map_err(db)?;
                tracing::info!(version, "applied a database migration");
            }
            tx.commit().await.map_err(db)
        })
    }

    /// Makes the partition of `table` for `day` (days since 1970) unless it is known. A
    /// partition that cannot be made (its rows already sit in the default partition) is
    /// logged once; its rows keep going to the default partition.
    fn ensure_partition(&self, table: &'static str, day: u64) {
        let Ok(mut known) = self.partitions.lock() else {
            return;
        };
        if !known.insert((table, day)) {
            return;
        }
        drop(known);
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {table}_d{day} PARTITION OF {table} \
             FOR VALUES FROM ({}) TO ({})",
            day * DAY,
            (day + 1) * DAY
        );
        let made: Result<()> = self.block(async {
            let client = self.client().await?;
            client.batch_execute(&sql).await.map_err(db)
        });
        if let Err(e) = made {
            // Two replicas making it at once: one of them sees a duplicate name.
            if !e.to_string().contains("already exists") {
                tracing::warn!(table, day, error = %e, "cannot make a day partition");
                if matches!(e, FleetError::Database(_)) && self.check().is_err() {
                    // The database is away: try again on the next record.
                    if let Ok(mut known) = self.partitions.lock() {
                        known.remove(&(table, day));
                    }
                }
            }
        }
    }

    /// Whether the database answers.
    pub fn check(&self) -> Result<()> {
        self.block(async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await.map_err(db)?;
            Ok(())
        })
    }

    async fn next_id(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT nextval('ids')", &[])
            .await
            .map_err(db)?;
        Ok(unbig(row.try_get(0).map_err(db)?))
    }

    async fn docs<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<T>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(db)?;
        client
            .query(&statement, params)
            .await
            .map_err(db)?
            .iter()
            .map(|row| row.try_get::<_, Json<T>>(0).map(|j| j.0).map_err(db))
            .collect()
    }

    async fn doc<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<T>> {
        Ok(self.docs(sql, params).await?.into_iter().next())
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(db)?;
        client.execute(&statement, params).await.map_err(db)
    }

    async fn bodies(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredRecord>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(db)?;
        client
            .query(&statement, params)
            .await
            .map_err(db)?
            .iter()
            .map(|row| decode(row.try_get::<_, &[u8]>(0).map_err(db)?))
            .collect()
    }

    /// Applies `change` to a device's record under its row lock (made first when `create`);
    /// `None` for a device not known and not made.
    fn change_device(
        &self,
        id: &str,
        create: bool,
        change: &mut dyn FnMut(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>> {
        if let Some(out) = self.in_unit(|unit| change_device_in(unit, id, create, change)) {
            return out;
        }
        in_transaction!(self, |c| async {
            let select = c
                .prepare_cached("SELECT doc FROM devices WHERE id = $1 FOR UPDATE")
                .await
                .map_err(db)?;
            let mut row = c.query_opt(&select, &[&id]).await.map_err(db)?;
            if row.is_none() && create {
                let insert = c
                    .prepare_cached(
                        "INSERT INTO devices (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    )
                    .await
                    .map_err(db)?;
                c.execute(&insert, &[&id, &Json(new_device(id))])
                    .await
                    .map_err(db)?;
                row = c.query_opt(&select, &[&id]).await.map_err(db)?;
            }
            let Some(row) = row else {
                return Ok(None);
            };
            let mut record = row.try_get::<_, Json<DeviceRecord>>(0).map_err(db)?.0;
            change(&mut record);
            let update = c
                .prepare_cached("UPDATE devices SET doc = $2 WHERE id = $1")
                .await
                .map_err(db)?;
            c.execute(&update, &[&id, &Json(&record)])
                .await
                .map_err(db)?;
            Ok(Some(record))
        })
    }

    /// The address that names this store in [`UNIT`].
    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Runs `call` on this thread's open unit of this store, if there is one (marking the unit
    /// failed when the call fails, so that it is rolled back).
    fn in_unit<T>(&self, call: impl FnOnce(&mut Unit) -> Result<T>) -> Option<Result<T>> {
        let mut unit = UNIT.with(|unit| {
            let mut unit = unit.borrow_mut();
            if unit.as_ref().is_some_and(|u| u.store == self.address()) {
                unit.take()
            } else {
                None
            }
        })?;
        let out = call(&mut unit);
        if out.is_err() {
            unit.failed = true;
        }
        UNIT.with(|slot| *slot.borrow_mut() = Some(unit));
        Some(out)
    }

    /// A new connection for units, on a runtime of its own.
    fn unit_connection(&self) -> Result<UnitConnection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut config = self.config.clone();
        config.application_name("outpost-fleet ingest");
        let client = runtime.block_on(async {
            let (client, connection) = config.connect(self.tls.clone()).await.map_err(db)?;
            // Polled whenever the unit's thread blocks on this runtime.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            // Durable at the flush, not at each commit; and never an unbounded wait for a
            // row another replica holds.
            client
                .batch_execute("SET synchronous_commit TO off; SET lock_timeout TO '10s'")
                .await
                .map_err(db)?;
            Ok::<_, FleetError>(client)
        })?;
        Ok(UnitConnection {
            runtime,
            client,
            statements: RefCell::new(HashMap::new()),
        })
    }

    fn device_page(&self, after: Option<&str>) -> Result<Vec<DeviceRecord>> {
        self.block(async {
            match after {
                Some(after) => {
                    self.docs(
                        "SELECT doc FROM devices WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&after, &DEVICE_PAGE],
                    )
                    .await
                }
                None => {
                    self.docs(
                        "SELECT doc FROM devices ORDER BY id LIMIT $1",
                        &[&DEVICE_PAGE],
                    )
                    .await
                }
            }
        })
    }
}

/// Refuses a write that would be published unless this process still holds the publishing
/// role: under a share lock on the role's row, which a new holder's epoch bump waits for.
async fn fence(tx: &deadpool_postgres::Transaction<'_>, epoch: i64) -> Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DESIRED_LOCK])
        .await
        .map_err(db)?;
    let row = tx
        .query_one(
            "SELECT epoch, holder FROM leadership WHERE id = 1 FOR SHARE",
            &[],
        )
        .await
        .map_err(db)?;
    let current: i64 = row.try_get(0).map_err(db)?;
    if epoch == 0 || current != epoch {
        let holder: Option<String> = row.try_get(1).map_err(db)?;
        return Err(FleetError::NotPublishing(holder));
    }
    Ok(())
}

/// Devices read a page at a time.
struct DevicePages<'a> {
    store: &'a PgStore,
    after: Option<String>,
    buffer: VecDeque<DeviceRecord>,
    done: bool,
}

impl Iterator for DevicePages<'_> {
    type Item = Result<DeviceRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() && !self.done {
            match self.store.device_page(self.after.as_deref()) {
                Ok(page) => {
                    self.done = (page.len() as i64) < DEVICE_PAGE;
                    self.after = page.last().map(|d| d.id.clone());
                    self.buffer = page.into();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.buffer.pop_front().map(Ok)
    }
}

fn new_device(id: &str) -> DeviceRecord {
    DeviceRecord {
        id: id.to_owned(),
        ..DeviceRecord::default()
    }
}

impl FleetStore for PgStore {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn check(&self) -> Result<()> {
        PgStore::check(self)
    }

    fn try_lead(&self, replica: &str, api: Option<&str>) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let mut role = self
            .role
            .lock()
            .map_err(|_| FleetError::Corrupt("role lock poisoned".into()))?;
        if role.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(true);
        }
        *role = None;
        self.epoch.store(0, Ordering::SeqCst);
        let mut config = self.config.clone();
        config
            .keepalives(true)
            .keepalives_idle(ROLE_KEEPALIVE)
            .keepalives_interval(ROLE_KEEPALIVE)
            .keepalives_retries(2)
            .application_name("outpost-fleet role");
        self.block(async {
            let (client, connection) = config.connect(self.tls.clone()).await.map_err(db)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&ROLE_LOCK])
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            if !locked {
                return Ok(false);
            }
            let epoch: i64 = client
                .query_one(
                    "UPDATE leadership SET epoch = epoch + 1, holder = $1, since = $2, api = $3 \
                     WHERE id = 1 RETURNING epoch",
                    &[&replica, &big(now_secs()), &api],
                )
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            self.epoch.store(epoch, Ordering::SeqCst);
            *role = Some(client);
            tracing::info!(epoch, "holding the publishing role's lock");
            Ok(true)
        })
    }

    fn still_leading(&self) -> bool {
        use std::sync::atomic::Ordering;
        let Ok(mut role) = self.role.lock() else {
            return false;
        };
        let alive = match role.as_ref() {
            None => false,
            Some(client) if client.is_closed() => false,
            Some(client) => self.block(async {
                tokio::time::timeout(TIMEOUT, client.simple_query("SELECT 1"))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }),
        };
        if !alive {
            // Dropping the connection lets go of the lock, if the database still has it.
            *role = None;
            self.epoch.store(0, Ordering::SeqCst);
        }
        alive
    }

    fn leader(&self) -> Result<Option<Leader>> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT holder, api FROM leadership WHERE id = 1", &[])
                .await
                .map_err(db)?;
            let replica: Option<String> = row.try_get(0).map_err(db)?;
            let api: Option<String> = row.try_get(1).map_err(db)?;
            Ok(replica.map(|replica| Leader { replica, api }))
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.block(async {
            let client = self.client().await?;
            let row = client
                .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .await
                .map_err(db)?;
            row.map(|r| r.try_get::<_, Vec<u8>>(0).map_err(db))
                .transpose()
        })
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.block(self.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value],
        ))
        .map(|_| ())
    }

    fn update_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
    ) -> Result<DeviceRecord> {
        self.change_device(id, true, change)?
            .ok_or_else(|| FleetError::Corrupt(format!("device `{id}` vanished while updated")))
    }

    fn update_known_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
    ) -> Result<bool> {
        Ok(self.change_device(id, false, change)?.is_some())
    }

    fn remove_device(&self, id: &str) -> Result<bool> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let known = tx
                .execute("DELETE FROM devices WHERE id = $1", &[&id])
                .await
                .map_err(db)?;
            let desired = tx
                .execute("DELETE FROM desired WHERE device = $1", &[&id])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(known + desired > 0)
        })
    }

    fn put_credential(&self, device: &str, credential: &Credential) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute(
                "INSERT INTO credentials (device, doc) VALUES ($1, $2) \
                 ON CONFLICT (device) DO UPDATE SET doc = EXCLUDED.doc",
                &[&device, &Json(credential)],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO devices (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&device, &Json(new_device(device))],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
        })
    }

    fn remove_credential(&self, device: &str) -> Result<bool> {
        self.block(self.execute("DELETE FROM credentials WHERE device = $1", &[&device]))
            .map(|n| n > 0)
    }

    fn credentials(&self) -> Result<Vec<(String, Credential)>> {
        self.block(async {
            let client = self.client().await?;
            client
                .query("SELECT device, doc FROM credentials ORDER BY device", &[])
                .await
                .map_err(db)?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get::<_, String>(0).map_err(db)?,
                        row.try_get::<_, Json<Credential>>(1).map_err(db)?.0,
                    ))
                })
                .collect()
        })
    }

    fn is_enrolled(&self, device: &str) -> Result<bool> {
        self.block(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached("SELECT 1 FROM credentials WHERE device = $1")
                .await
                .map_err(db)?;
            Ok(client
                .query_opt(&statement, &[&device])
                .await
                .map_err(db)?
                .is_some())
        })
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        if let Some(out) = self.in_unit(|unit| device_in(unit, id)) {
            return out;
        }
        self.block(self.doc("SELECT doc FROM devices WHERE id = $1", &[&id]))
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.block(self.docs("SELECT doc FROM devices ORDER BY id", &[]))
    }

    fn devices_after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = Result<DeviceRecord>> + 'a> {
        Box::new(DevicePages {
            store: self,
            after: after.map(str::to_owned),
            buffer: VecDeque::new(),
            done: false,
        })
    }

    fn put_record_sized(
        &self,
        stream: Stream,
        device: &str,
        record: &TelemetryRecord,
    ) -> Result<(Put, u64)> {
        let (table, keys) = tables(stream);
        let bytes = encode(&StoredRecord {
            device: device.to_owned(),
            record: record.clone(),
        })?;
        let sha = sha2::Sha256::digest(&bytes).to_vec();
        let size = bytes.len() as u64;
        let received = now_secs();
        self.ensure_partition(table, received / DAY);
        // The key and the record in one statement (one round trip): the record goes in only
        // when its key did.
        let insert = format!(
            "WITH k AS (INSERT INTO {keys} (device, seq, variant, sha256, size, received) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING device, seq, variant) \
             INSERT INTO {table} (device, seq, variant, time, received, body) \
             SELECT device, seq, variant, $7, $6, $8 FROM k"
        );
        let select_key =
            format!("SELECT sha256 FROM {keys} WHERE device = $1 AND seq = $2 AND variant = $3");
        in_transaction!(self, |tx| async {
            let insert = tx.prepare_cached(&insert).await.map_err(db)?;
            let select_key = tx.prepare_cached(&select_key).await.map_err(db)?;
            let seq = big(record.seq);
            let size_col = i32::try_from(size).unwrap_or(i32::MAX);
            for variant in 0..i16::from(MAX_VARIANTS) {
                let taken = tx
                    .execute(
                        &insert,
                        &[
                            &device,
                            &seq,
                            &variant,
                            &sha,
                            &size_col,
                            &big(received),
                            &big(record.time),
                            &bytes,
                        ],
                    )
                    .await
                    .map_err(db)?;
                if taken == 1 {
                    let put = if variant == 0 {
                        Put::New
                    } else {
                        Put::Conflict
                    };
                    return Ok((put, size));
                }
                let existing = tx
                    .query_opt(&select_key, &[&device, &seq, &variant])
                    .await
                    .map_err(db)?;
                if let Some(row) = existing
                    && row.try_get::<_, &[u8]>(0).map_err(db)? == sha.as_slice()
                {
                    return Ok((Put::Duplicate, 0));
                }
            }
            Ok((Put::ConflictDropped, 0))
        })
    }

    fn records(
        &self,
        stream: Stream,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let (table, _) = tables(stream);
        let after = after.map_or(-1, big);
        let limit = big(limit as u64);
        self.block(async {
            match device {
                Some(device) => {
                    self.bodies(
                        &format!(
                            "SELECT body FROM {table} WHERE device = $1 AND seq > $2 \
                             ORDER BY seq, variant LIMIT $3"
                        ),
                        &[&device, &after, &limit],
                    )
                    .await
                }
                None => {
                    self.bodies(
                        &format!(
                            "SELECT body FROM {table} WHERE seq > $1 \
                             ORDER BY device, seq, variant LIMIT $2"
                        ),
                        &[&after, &limit],
                    )
                    .await
                }
            }
        })
    }

    /// Retention by whole days of receipt: the records received before the UTC day `cutoff`
    /// falls in go, by dropping their partitions (and deleting any that went to the default
    /// one). `limit` does not apply: a partition goes at once. One replica prunes at a time.
    fn prune(&self, stream: Stream, cutoff: u64, _limit: usize) -> Result<usize> {
        let (table, keys) = tables(stream);
        let floor = big(cutoff / DAY * DAY);
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let locked: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            if !locked {
                return Ok(0);
            }
            tx.execute(
                &format!(
                    "UPDATE devices d SET doc = jsonb_set(d.doc, '{{stored_bytes}}', \
                     to_jsonb(GREATEST(0, COALESCE((d.doc->>'stored_bytes')::bigint, 0) - f.bytes))) \
                     FROM (SELECT device, sum(size)::bigint AS bytes FROM {keys} \
                           WHERE received < $1 GROUP BY device) f \
                     WHERE d.id = f.device"
                ),
                &[&floor],
            )
            .await
            .map_err(db)?;
            let removed = tx
                .execute(&format!("DELETE FROM {keys} WHERE received < $1"), &[&floor])
                .await
                .map_err(db)?;
            let partitions = tx
                .query(
                    "SELECT c.relname::text FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = $1::text::regclass",
                    &[&table],
                )
                .await
                .map_err(db)?;
            let prefix = format!("{table}_d");
            let mut dropped = Vec::new();
            for row in partitions {
                let name: String = row.try_get(0).map_err(db)?;
                let Some(day) = name
                    .strip_prefix(&prefix)
                    .and_then(|d| d.parse::<u64>().ok())
                else {
                    continue;
                };
                if big((day + 1) * DAY) <= floor {
                    tx.batch_execute(&format!("DROP TABLE {name}"))
                        .await
                        .map_err(db)?;
                    dropped.push(day);
                }
            }
            tx.execute(
                &format!("DELETE FROM {table}_default WHERE received < $1"),
                &[&floor],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            if let Ok(mut known) = self.partitions.lock() {
                for day in dropped {
                    known.remove(&(table, day));
                }
            }
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }

    /// Device messages are committed without waiting for the disk ([`FleetStore::unit`]);
    /// one synchronous commit after them waits until the log holds all of them.
    fn flush(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.unflushed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let written = self.block(self.execute(
            "INSERT INTO outpost_flush (id, n, at) VALUES ($1, 1, $2) \
             ON CONFLICT (id) DO UPDATE SET n = outpost_flush.n + 1, at = $2",
            &[&self.flush_id, &big(now_secs())],
        ));
        if written.is_err() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        written.map(|_| ())
    }

    /// One transaction on one connection for everything `work` writes on this thread,
    /// committed without waiting for the disk (`synchronous_commit` off: [`Self::flush`]
    /// makes it durable), or rolled back when `work` returns false or a statement in it
    /// failed. Day partitions are made before it opens: making one while the unit holds a
    /// lock on its table would wait for the unit itself.
    fn unit(&self, work: &mut dyn FnMut() -> bool) -> Result<bool> {
        self.unit_locking(&[], work)
    }

    /// All of the batch in one unit, its devices' rows locked first, in one order (by id):
    /// two replicas storing messages of the same devices then wait for each other, never
    /// deadlock; and the unit reads each record once.
    fn unit_of_many(
        &self,
        devices: &[&str],
        n: usize,
        work: &mut dyn FnMut(usize) -> bool,
    ) -> Result<bool> {
        self.unit_locking(devices, &mut || (0..n).all(&mut *work))
    }

    fn put_bundle(&self, record: &BundleRecord, bytes: &[u8]) -> Result<()> {
        write_artifact(&self.artifacts, &record.digest, bytes)?;
        self.block(self.execute(
            "INSERT INTO bundles (name, version, digest, doc) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name, version) DO UPDATE SET digest = EXCLUDED.digest, doc = EXCLUDED.doc",
            &[&record.name, &record.version, &record.digest, &Json(record)],
        ))
        .map(|_| ())
    }

    fn remove_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        let removed: Option<(BundleRecord, bool)> = self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let Some(row) = tx
                .query_opt(
                    "DELETE FROM bundles WHERE name = $1 AND version = $2 RETURNING doc",
                    &[&name, &version],
                )
                .await
                .map_err(db)?
            else {
                return Ok(None);
            };
            let record = row.try_get::<_, Json<BundleRecord>>(0).map_err(db)?.0;
            let shared = tx
                .query_opt(
                    "SELECT 1 FROM bundles WHERE digest = $1 LIMIT 1",
                    &[&record.digest],
                )
                .await
                .map_err(db)?
                .is_some();
            tx.commit().await.map_err(db)?;
            Ok::<_, FleetError>(Some((record, shared)))
        })?;
        let Some((record, shared)) = removed else {
            return Ok(None);
        };
        if !shared {
            match std::fs::remove_file(self.artifact_path(&record.digest)?) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(record))
    }

    fn bundles(&self) -> Result<Vec<BundleRecord>> {
        self.block(self.docs(
            "SELECT doc FROM bundles ORDER BY (name || '@' || version) COLLATE \"C\"",
            &[],
        ))
    }

    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        self.block(self.doc(
            "SELECT doc FROM bundles WHERE name = $1 AND version = $2",
            &[&name, &version],
        ))
    }

    fn artifact_path(&self, digest: &str) -> Result<PathBuf> {
        artifact_path_in(&self.artifacts, digest)
    }

    fn update_desired_with(
        &self,
        device: &str,
        make: &mut dyn FnMut(Option<&DesiredRecord>) -> Result<DesiredRecord>,
    ) -> Result<DesiredRecord> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            fence(&tx, self.epoch.load(std::sync::atomic::Ordering::SeqCst)).await?;
            let previous = match tx
                .query_opt(
                    "SELECT doc FROM desired WHERE device = $1 FOR UPDATE",
                    &[&device],
                )
                .await
                .map_err(db)?
            {
                Some(row) => Some(row.try_get::<_, Json<DesiredRecord>>(0).map_err(db)?.0),
                None => None,
            };
            let next = make(previous.as_ref())?;
            tx.execute(
                "INSERT INTO desired (device, generation, doc) VALUES ($1, $2, $3) \
                 ON CONFLICT (device) DO UPDATE SET generation = EXCLUDED.generation, doc = EXCLUDED.doc",
                &[&device, &big(next.generation), &Json(&next)],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(next)
        })
    }

    /// On the unit's connection when one is open (a reported state's catch-up reads it while
    /// the batch is stored: no hand-over to the pool's thread), else pooled.
    fn desired(&self, device: &str) -> Result<Option<DesiredRecord>> {
        const SQL: &str = "SELECT doc FROM desired WHERE device = $1";
        let in_unit = on_unit!(self, |c| async {
            let statement = c.prepare_cached(SQL).await.map_err(db)?;
            c.query_opt(&statement, &[&device])
                .await
                .map_err(db)?
                .map(|row| {
                    row.try_get::<_, Json<DesiredRecord>>(0)
                        .map(|j| j.0)
                        .map_err(db)
                })
                .transpose()
        });
        in_unit.unwrap_or_else(|| self.block(self.doc(SQL, &[&device])))
    }

    fn all_desired(&self) -> Result<Vec<DesiredRecord>> {
        self.block(self.docs("SELECT doc FROM desired ORDER BY device", &[]))
    }

    fn desired_and_enrolled(&self, devices: &[&str]) -> Result<Vec<(Option<DesiredRecord>, bool)>> {
        self.block(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT ds.doc, c.device IS NOT NULL \
                     FROM unnest($1::text[]) WITH ORDINALITY AS d(id, n) \
                     LEFT JOIN desired ds ON ds.device = d.id \
                     LEFT JOIN credentials c ON c.device = d.id \
                     ORDER BY d.n",
                )
                .await
                .map_err(db)?;
            client
                .query(&statement, &[&devices])
                .await
                .map_err(db)?
                .iter()
                .map(|row| {
                    let desired = row
                        .try_get::<_, Option<Json<DesiredRecord>>>(0)
                        .map_err(db)?
                        .map(|j| j.0);
                    Ok((desired, row.try_get::<_, bool>(1).map_err(db)?))
                })
                .collect()
        })
    }

    fn desired_generations(&self) -> Result<HashMap<String, u64>> {
        self.block(async {
            let client = self.client().await?;
            client
                .query("SELECT device, generation FROM desired", &[])
                .await
                .map_err(db)?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get::<_, String>(0).map_err(db)?,
                        unbig(row.try_get::<_, i64>(1).map_err(db)?),
                    ))
                })
                .collect()
        })
    }

    fn record_deployment_with(
        &self,
        devices: &[DeviceId],
        make: &mut dyn FnMut(&DeviceId, Option<&DesiredRecord>) -> Result<DesiredRecord>,
        mut record: DeploymentRecord,
    ) -> Result<(Vec<DesiredRecord>, DeploymentRecord)> {
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            fence(&tx, self.epoch.load(std::sync::atomic::Ordering::SeqCst)).await?;
            let mut previous: HashMap<String, DesiredRecord> = HashMap::new();
            for row in tx
                .query(
                    "SELECT device, doc FROM desired WHERE device = ANY($1) ORDER BY device FOR UPDATE",
                    &[&ids],
                )
                .await
                .map_err(db)?
            {
                previous.insert(
                    row.try_get(0).map_err(db)?,
                    row.try_get::<_, Json<DesiredRecord>>(1).map_err(db)?.0,
                );
            }
            let mut next = Vec::with_capacity(devices.len());
            for device in devices {
                next.push(make(device, previous.get(device.as_str()))?);
            }
            let id: i64 = tx
                .query_one("SELECT nextval('ids')", &[])
                .await
                .map_err(db)?
                .try_get(0)
                .map_err(db)?;
            record.id = unbig(id);
            let names: Vec<&str> = next.iter().map(|d| d.device.as_str()).collect();
            let generations: Vec<i64> = next.iter().map(|d| big(d.generation)).collect();
            let docs: Vec<String> = next
                .iter()
                .map(|d| serde_json::to_string(d).map_err(|e| FleetError::Corrupt(e.to_string())))
                .collect::<Result<_>>()?;
            tx.execute(
                "INSERT INTO desired (device, generation, doc) \
                 SELECT d, g, j::jsonb FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(d, g, j) \
                 ON CONFLICT (device) DO UPDATE SET generation = EXCLUDED.generation, doc = EXCLUDED.doc",
                &[&names, &generations, &docs],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO deployments (id, doc) VALUES ($1, $2)",
                &[&id, &Json(&record)],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok((next, record))
        })
    }

    fn recent_records(
        &self,
        stream: Stream,
        device: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let (table, _) = tables(stream);
        let mut out = self.block(self.bodies(
            &format!(
                "SELECT body FROM {table} WHERE device = $1 AND time >= $2 \
                 ORDER BY seq DESC, variant DESC LIMIT $3"
            ),
            &[&device, &big(since), &big(limit as u64)],
        ))?;
        out.reverse();
        Ok(out)
    }

    fn next_rollout_id(&self) -> Result<u64> {
        self.block(self.next_id())
    }

    fn put_rollout(&self, rollout: &outpost_proto::rest::RolloutRecord) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            fence(&tx, self.epoch.load(std::sync::atomic::Ordering::SeqCst)).await?;
            tx.execute(
                "INSERT INTO rollouts (id, doc) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
                &[&big(rollout.id), &Json(rollout)],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
        })
    }

    fn rollout(&self, id: u64) -> Result<Option<outpost_proto::rest::RolloutRecord>> {
        self.block(self.doc("SELECT doc FROM rollouts WHERE id = $1", &[&big(id)]))
    }

    fn rollouts(&self) -> Result<Vec<outpost_proto::rest::RolloutRecord>> {
        self.block(self.docs("SELECT doc FROM rollouts ORDER BY id", &[]))
    }

    fn next_firing_id(&self) -> Result<u64> {
        self.block(self.next_id())
    }

    fn put_firing(&self, firing: &outpost_proto::rest::FiringRecord) -> Result<()> {
        self.block(self.execute(
            "INSERT INTO firings (id, doc) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
            &[&big(firing.id), &Json(firing)],
        ))
        .map(|_| ())
    }

    fn firings(&self, limit: usize) -> Result<Vec<outpost_proto::rest::FiringRecord>> {
        let mut out: Vec<outpost_proto::rest::FiringRecord> = self.block(self.docs(
            "SELECT doc FROM firings ORDER BY id DESC LIMIT $1",
            &[&big(limit as u64)],
        ))?;
        out.reverse();
        Ok(out)
    }

    fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.block(self.docs("SELECT doc FROM deployments ORDER BY id", &[]))
    }
}

impl PgStore {
    /// [`FleetStore::unit`], with the rows of `devices` locked (and read) first.
    fn unit_locking(&self, devices: &[&str], work: &mut dyn FnMut() -> bool) -> Result<bool> {
        let day = now_secs() / DAY;
        for stream in [Stream::Telemetry, Stream::Events] {
            self.ensure_partition(tables(stream).0, day);
            self.ensure_partition(tables(stream).0, day + 1);
        }
        if UNIT.with(|unit| unit.borrow().is_some()) {
            // Nested: part of the unit already open.
            return Ok(work());
        }
        let taken = self
            .unit_connection
            .lock()
            .map_err(|_| FleetError::Corrupt("unit connection lock poisoned".into()))?
            .take()
            .filter(|c| !c.client.is_closed());
        let connection = match taken {
            Some(connection) => connection,
            None => self.unit_connection()?,
        };
        let locked = connection.runtime.block_on(async {
            connection.client.batch_execute("BEGIN").await.map_err(db)?;
            let mut locked = HashMap::new();
            if devices.is_empty() {
                return Ok::<_, FleetError>(locked);
            }
            let lock = UnitClient(&connection)
                .prepare_cached(
                    "SELECT id, doc FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .await
                .map_err(db)?;
            for row in connection
                .client
                .query(&lock, &[&devices])
                .await
                .map_err(db)?
            {
                let id: String = row.try_get(0).map_err(db)?;
                let doc = row.try_get::<_, Json<DeviceRecord>>(1).map_err(db)?.0;
                locked.insert(id, doc);
            }
            Ok(locked)
        });
        let locked = match locked {
            Ok(locked) => locked,
            Err(e) => {
                // Its transaction ends with it.
                drop(connection);
                return Err(e);
            }
        };
        UNIT.with(|unit| {
            *unit.borrow_mut() = Some(Unit {
                store: self.address(),
                connection,
                failed: false,
                devices: locked,
            })
        });
        let open = OpenUnit(self.address());
        let kept = work();
        let Some(unit) = open.close() else {
            return Err(FleetError::Corrupt("a unit of writes went missing".into()));
        };
        let keep = kept && !unit.failed;
        let end = if keep { "COMMIT" } else { "ROLLBACK" };
        let connection = unit.connection;
        connection
            .runtime
            .block_on(connection.client.batch_execute(end))
            .map_err(db)?;
        if let Ok(mut slot) = self.unit_connection.lock() {
            *slot = Some(connection);
        }
        if keep {
            self.unflushed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(keep)
    }
}

#[cfg(test)]
#[path = "store_pg_tests.rs"]
mod tests;
