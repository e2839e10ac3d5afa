//! The seven positional arguments of `tuplespace server` (SPEC §2), checked.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::net::endpoint::{NetError, resolve_sap};

/// Checked server arguments. SAPs are kept as typed too, to be passed on to a backup unchanged.
#[derive(Clone, Debug)]
pub struct ServerArgs {
    pub shutdown_sap: SocketAddr,
    pub shutdown_sap_text: String,
    pub proxy_sap: SocketAddr,
    pub proxy_sap_text: String,
    pub backup_sap: SocketAddr,
    pub backup_sap_text: String,
    pub heartbeat_sap: SocketAddr,
    pub heartbeat_sap_text: String,
    pub save_file: Option<PathBuf>,
    /// None when starting as the primary; else the primary's pid (local) or SHUTDOWN_SAP (remote).
    pub primary_handle: Option<String>,
    pub init_file: Option<PathBuf>,
    /// Global flags (--certs, --config, --set) handed on to a backup started by this server.
    pub passthrough: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("argument {pos} ({name}): {source}")]
    Sap {
        pos: usize,
        name: &'static str,
        source: NetError,
    },
    #[error("argument 7 (INIT_FILE): a backup always starts empty, pass null (got `{0}`)")]
    BackupWithInit(String),
}

impl ServerArgs {
    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        shutdown: &str,
        proxy: &str,
        backup: &str,
        heartbeat: &str,
        save_file: &str,
        primary_handle: &str,
        init_file: &str,
    ) -> Result<ServerArgs, ArgsError> {
        let sap = |pos, name, s: &str| {
            resolve_sap(s).map_err(|source| ArgsError::Sap { pos, name, source })
        };
        let primary_handle = (primary_handle != "null").then(|| primary_handle.to_owned());
        if primary_handle.is_some() && init_file != "null" {
            return Err(ArgsError::BackupWithInit(init_file.to_owned()));
        }
        Ok(ServerArgs {
            shutdown_sap: sap(1, "SHUTDOWN_SAP", shutdown)?,
            shutdown_sap_text: shutdown.to_owned(),
            proxy_sap: sap(2, "PROXY_SAP", proxy)?,
            proxy_sap_text: proxy.to_owned(),
            backup_sap: sap(3, "BACKUP_SAP", backup)?,
            backup_sap_text: backup.to_owned(),
            heartbeat_sap: sap(4, "HEARTBEAT_SAP", heartbeat)?,
            heartbeat_sap_text: heartbeat.to_owned(),
            save_file: super::null_path(save_file),
            primary_handle,
            init_file: super::null_path(init_file),
            passthrough: Vec::new(),
        })
    }
}
