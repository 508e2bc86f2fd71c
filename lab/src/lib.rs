//! meshd's lab: a Kubernetes-compatible API server and a cluster of nodes and pods in network
//! namespaces, driven by `meshd-lab …` and by the end-to-end tests.

pub mod apiserver;
pub mod pki;
pub mod topology;
