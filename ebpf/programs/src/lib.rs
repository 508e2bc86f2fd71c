//! Only a library so that the datapath crate can name this package as a build dependency (cargo
//! rebuilds the programs when they change); the programs are the `meshd-tc` binary.
#![no_std]
