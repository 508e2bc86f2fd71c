//! WireGuard for meshd: keys, the UAPI protocol, the userspace device (boringtun's noise core
//! with our own I/O), and the peer set the agent derives from CiliumNodes.

pub mod fuzzing;
pub mod kernel;
pub mod key;
pub mod offload;
pub mod peers;
pub mod tun;
pub mod uapi;
pub mod userspace;

pub const INTERFACE: &str = "cilium_wg0";
pub const LISTEN_PORT: u16 = 51871;
pub const FWMARK: u32 = 0x1e00;
/// Underlay MTU minus this is the WireGuard device's MTU (Cilium's WireguardOverhead).
pub const OVERHEAD: u32 = 80;

/// One WireGuard device, whichever backend runs it; the agent reconciles through this.
pub enum Device {
    Kernel(kernel::KernelDevice),
    Userspace(std::path::PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Uapi(#[from] uapi::UapiError),
    #[error("the UAPI call did not finish: {0}")]
    Join(String),
}

impl Device {
    pub async fn get(&self) -> Result<uapi::DeviceInfo, DeviceError> {
        match self {
            Self::Kernel(k) => Ok(k.get().await?),
            Self::Userspace(path) => {
                let c = uapi::Client::new(path);
                Ok(tokio::task::spawn_blocking(move || c.get())
                    .await
                    .map_err(|e| DeviceError::Join(e.to_string()))??)
            }
        }
    }

    pub async fn set(&self, update: uapi::DeviceUpdate) -> Result<(), DeviceError> {
        match self {
            Self::Kernel(k) => Ok(k.set(&update).await?),
            Self::Userspace(path) => {
                let c = uapi::Client::new(path);
                Ok(tokio::task::spawn_blocking(move || c.set(&update))
                    .await
                    .map_err(|e| DeviceError::Join(e.to_string()))??)
            }
        }
    }
}
