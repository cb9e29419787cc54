//! Microsoft Graph cloud communications: id normalisation, the `commsNotifications`
//! decoder, and the `cancelMediaProcessing` client (its tokens come from [`crate::identity`]).

pub mod client;
pub mod ids;
pub mod notifications;
