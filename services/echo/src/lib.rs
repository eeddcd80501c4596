//! The echo service: answers with its message and what each hop saw of the call. Its relay
//! goes through mesh-layer clients, so it shows what the mesh does between services: a
//! deadline that shrinks at every hop, a retry that is not retried again downstream.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_layer::{
    balance::Balancer, client::MeshClient, connection::Connection, context::CallContext,
    method::MethodTable, policy::Policy,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use waybill_api::echo::v1::{
    self as pb,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};

const MAX_MESSAGE: usize = 64 * 1024;
const MAX_RELAY: usize = 8;
const MAX_DELAY_MS: u32 = 60_000;

type Client = EchoServiceClient<MeshClient<Balancer<Connection>>>;

/// The echo service.
#[derive(Clone)]
pub struct Echo {
    policy: Policy,
    methods: MethodTable,
    /// One mesh client per relay target, so relays reuse connections, budgets and breakers.
    clients: Arc<Mutex<HashMap<String, Client>>>,
}

impl Echo {
    /// An echo service whose relays use `policy`.
    pub fn new(policy: Policy) -> Result<Self, prost::DecodeError> {
        Ok(Self {
            policy,
            methods: MethodTable::from_descriptor_sets(&[waybill_api::FILE_DESCRIPTOR_SET])?,
            clients: Arc::default(),
        })
    }

    fn client(&self, target: &str) -> Result<Client, Status> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| Status::internal("relay client cache poisoned"))?;
        if let Some(client) = clients.get(target) {
            return Ok(client.clone());
        }
        let client = mesh_layer::client::balanced(target, &self.policy, &self.methods)
            .map(EchoServiceClient::new)
            .map_err(|e| Status::invalid_argument(format!("relay: {e}")))?;
        clients.insert(target.to_owned(), client.clone());
        Ok(client)
    }
}

/// The gRPC server for the echo service.
pub fn server(echo: Echo) -> EchoServiceServer<Echo> {
    EchoServiceServer::new(echo)
}

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(
        &self,
        request: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        let context = CallContext::current().unwrap_or_default();
        let hop = pb::Hop {
            deadline_remaining_ms: context
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as i64)
                .unwrap_or(-1),
            previous_attempts: context.previous_attempts,
        };
        let mut request = request.into_inner();
        if request.message.len() > MAX_MESSAGE {
            return Err(Status::invalid_argument("message: at most 64 KiB"));
        }
        if request.relay.len() > MAX_RELAY {
            return Err(Status::invalid_argument("relay: at most 8 hops"));
        }
        if request.delay_ms > MAX_DELAY_MS {
            return Err(Status::invalid_argument("delay_ms: at most 60000"));
        }
        if request.relay.is_empty() {
            if request.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(request.delay_ms))).await;
            }
            return Ok(Response::new(pb::EchoResponse {
                message: request.message,
                hops: vec![hop],
            }));
        }
        let next = request.relay.remove(0);
        // The mesh client gives the relayed call what is left of our deadline, minus a margin.
        let mut downstream = self.client(&next)?.echo(request).await?.into_inner();
        downstream.hops.insert(0, hop);
        Ok(Response::new(downstream))
    }
}
