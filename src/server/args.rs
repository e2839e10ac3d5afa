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
    /// The arguments after a promotion across hosts: SHUTDOWN_SAP and HEARTBEAT_SAP move to this
    /// (the backup's) address with the same ports; BACKUP_SAP moves to the old primary's address.
    pub fn swapped_hosts(&self) -> ServerArgs {
        let mine = self.backup_sap.ip();
        let theirs = self.shutdown_sap.ip();
        let at = |ip: std::net::IpAddr, port: u16| SocketAddr::new(ip, port);
        let mut a = self.clone();
        a.shutdown_sap = at(mine, self.shutdown_sap.port());
        a.heartbeat_sap = at(mine, self.heartbeat_sap.port());
        a.backup_sap = at(theirs, self.backup_sap.port());
        a.shutdown_sap_text = a.shutdown_sap.to_string();
        a.heartbeat_sap_text = a.heartbeat_sap.to_string();
        a.backup_sap_text = a.backup_sap.to_string();
        a
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positional_arguments_are_checked() {
        let a = ServerArgs::parse(
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3",
            "127.0.0.1:4",
            "null",
            "null",
            "null",
        )
        .unwrap();
        assert!(a.primary_handle.is_none() && a.save_file.is_none() && a.init_file.is_none());
        let e = ServerArgs::parse(
            "nope",
            "127.0.0.1:2",
            "127.0.0.1:3",
            "127.0.0.1:4",
            "null",
            "null",
            "null",
        )
        .unwrap_err();
        assert!(e.to_string().contains("argument 1 (SHUTDOWN_SAP)"), "{e}");
        let e = ServerArgs::parse(
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3",
            "127.0.0.1:4",
            "s",
            "42",
            "init.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("backup always starts empty"), "{e}");
    }

    #[test]
    fn promotion_across_hosts_swaps_addresses() {
        let a = ServerArgs::parse(
            "10.0.0.11:7410",
            "10.0.0.10:7401",
            "10.0.0.12:7411",
            "10.0.0.11:7412",
            "s",
            "10.0.0.11:7410",
            "null",
        )
        .unwrap();
        let b = a.swapped_hosts();
        assert_eq!(b.shutdown_sap_text, "10.0.0.12:7410");
        assert_eq!(b.heartbeat_sap_text, "10.0.0.12:7412");
        assert_eq!(b.backup_sap_text, "10.0.0.11:7411");
        assert_eq!(b.swapped_hosts().backup_sap_text, "10.0.0.12:7411");
    }
}
