//! One gRPC server for the services a process runs, with health, reflection, the mesh server
//! stack, and a graceful drain on shutdown.

use std::{convert::Infallible, future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::{
    body::Body,
    server::NamedService,
    service::RoutesBuilder,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use mesh_layer::{method::MethodTable, policy::Policy, shed::MethodCaps};

use crate::{Db, PgIdempotencyStore, ServerConfig, health};

/// How often expired idempotency keys are deleted.
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The gRPC services one process serves, collected before serving.
#[derive(Default)]
pub struct Services {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    tasks: Vec<BackgroundTask>,
    draining: Vec<BackgroundTask>,
    drain: tokio::sync::watch::Sender<bool>,
    caps: MethodCaps,
}

/// Tells a background task added with [`Services::background_draining`] that the process
/// is draining. Cheap to clone.
#[derive(Clone)]
pub struct Drain(tokio::sync::watch::Receiver<bool>);

impl Drain {
    /// Completes once draining started (at once if it has).
    pub async fn started(&mut self) {
        // An error means the sender is gone: the process is stopping anyway.
        let _ = self.0.wait_for(|&draining| draining).await;
    }
}

/// Work a service does beside answering calls (a sweeper, a relay, a consumer).
type BackgroundTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

impl Services {
    /// Adds a generated tonic server; its name is reported by health.
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Adds work to run beside the services while the process serves; it is stopped when
    /// draining starts.
    pub fn background(&mut self, task: impl Future<Output = ()> + Send + 'static) -> &mut Self {
        self.tasks.push(Box::pin(task));
        self
    }

    /// Adds work that must finish what it started when the process drains (command workers
    /// with attempts in flight): it is told through its [`Drain`] and given the same grace as
    /// in-flight calls, then stopped.
    pub fn background_draining<F, Fut>(&mut self, task: F) -> &mut Self
    where
        F: FnOnce(Drain) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let drain = Drain(self.drain.subscribe());
        self.draining.push(Box::pin(task(drain)));
        self
    }

    /// Holds method `path` (`/pkg.Service/Method`) to `max` calls at once (see
    /// [`MethodCaps`]): calls past it are shed before anything else runs, idempotency claims
    /// included.
    pub fn cap(&mut self, path: &str, max: usize) -> &mut Self {
        self.caps = std::mem::take(&mut self.caps).with(path, max);
        self
    }

    /// The fully qualified names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors did not load (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The method descriptors did not decode (a build problem).
    #[error("descriptors: {0}")]
    Descriptors(String),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `services` on `listener` until `shutdown` completes, then drains.
///
/// Draining: health turns NOT_SERVING, the listener closes, every connection gets an HTTP/2
/// GOAWAY so clients open no new streams, and in-flight calls finish. Calls still running after
/// `config.shutdown_grace` are abandoned so the process always exits.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    db: Db,
    config: &ServerConfig,
    policy: &Policy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Services {
        mut routes,
        names,
        tasks,
        draining,
        drain,
        caps,
    } = services;
    let tasks: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let draining: Vec<_> = draining.into_iter().map(tokio::spawn).collect();

    let methods = MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])
        .map_err(|e| ServeError::Descriptors(e.to_string()))?;
    let store = PgIdempotencyStore::new(db.clone());
    let purge = tokio::spawn(store.clone().purge_forever(PURGE_INTERVAL));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Not serving until the first probe of the primary succeeds; alive from the start.
    health::set_all(&reporter, &names, ServingStatus::NotServing).await;
    reporter
        .set_service_status(health::LIVENESS, ServingStatus::Serving)
        .await;
    let sampler = tokio::spawn(crate::metrics::sample_databases(
        db.clone(),
        config.health_interval,
    ));
    let monitor = tokio::spawn(health::monitor(
        db,
        reporter.clone(),
        names.clone(),
        config.health_interval,
    ));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(waybill_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    routes
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        // grpcurl speaks v1; grpcio's reflection client (Python) still speaks v1alpha.
        .add_service(reflection().build_v1alpha()?);

    // Small unary calls must not wait for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .layer(mesh_layer::server::trace())
        .layer(mesh_layer::server::stack(
            policy,
            &methods,
            Arc::new(store),
            caps,
        ))
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, async {
            let _ = drain_rx.await;
        });
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            monitor.abort();
            sampler.abort();
            purge.abort();
            tasks.iter().for_each(|task| task.abort());
            draining.iter().for_each(|task| task.abort());
            return result.map_err(ServeError::from);
        }
        () = shutdown => {}
    }

    monitor.abort();
    sampler.abort();
    purge.abort();
    tasks.iter().for_each(|task| task.abort());
    health::set_all(&reporter, &names, ServingStatus::NotServing).await;
    let _ = drain_tx.send(());
    drain.send_replace(true);
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight calls");
    let aborts: Vec<_> = draining.iter().map(|task| task.abort_handle()).collect();
    let drained = async {
        let result = (&mut server).await;
        for task in draining {
            let _ = task.await;
        }
        result
    };
    match tokio::time::timeout(config.shutdown_grace, drained).await {
        Ok(result) => {
            tracing::info!("drained; stopped");
            result.map_err(ServeError::from)
        }
        Err(_) => {
            aborts.iter().for_each(|task| task.abort());
            tracing::warn!(grace = ?config.shutdown_grace, "calls or background work still running after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; the process stops only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
